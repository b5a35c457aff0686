//! Flower: a Deployment, a Service, and optionally an Ingress.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ContainerPort, Probe, Service, ServicePort, ServiceSpec, TCPSocketAction,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    celery_container, child_meta, flower_name, non_empty_map, pod_template, secret_env, selector,
    selector_labels,
};
use crate::children::{Child, ChildKind};
use crate::crd::{Celery, FlowerIngress, FlowerSpec, ServiceType};

const COMPONENT: &str = "flower";
const PORT_NAME: &str = "http";
/// Environment variable Flower reads its basic-auth users from.
pub const BASIC_AUTH_ENV: &str = "FLOWER_BASIC_AUTH";

/// Flower's Deployment, Service and (when asked for) Ingress.
pub fn children(celery: &Celery, flower: &FlowerSpec) -> Vec<Child> {
    let name = flower_name(celery);
    let mut out = vec![
        Child::new(ChildKind::Deployment, &name, &deployment(celery, flower)),
        Child::new(ChildKind::Service, &name, &service(celery, flower)),
    ];
    if let Some(ingress_spec) = &flower.ingress {
        out.push(Child::new(
            ChildKind::Ingress,
            &name,
            &ingress(celery, ingress_spec),
        ));
    }
    out
}

fn deployment(celery: &Celery, flower: &FlowerSpec) -> Deployment {
    let mut args = vec!["flower".to_string(), format!("--port={}", flower.port)];
    args.extend(flower.args.iter().cloned());
    let auth: Vec<_> = flower
        .basic_auth_secret_ref
        .iter()
        .map(|s| secret_env(BASIC_AUTH_ENV, s))
        .collect();
    let mut container = celery_container(celery, COMPONENT, args, &auth);
    container.ports = Some(vec![ContainerPort {
        name: Some(PORT_NAME.into()),
        container_port: flower.port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }]);
    container.resources = flower.resources.clone();
    // A TCP check works whatever Flower's auth and URL prefix are.
    let tcp = |initial, period, failures| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String(PORT_NAME.into()),
            host: None,
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    container.readiness_probe = Some(tcp(5, 10, 3));
    container.liveness_probe = Some(tcp(30, 30, 5));
    Deployment {
        metadata: child_meta(celery, flower_name(celery), COMPONENT, None),
        spec: Some(DeploymentSpec {
            replicas: Some(flower.replicas),
            selector: selector(celery, COMPONENT, None),
            template: pod_template(celery, COMPONENT, None, container),
            ..Default::default()
        }),
        status: None,
    }
}

fn service(celery: &Celery, flower: &FlowerSpec) -> Service {
    Service {
        metadata: child_meta(celery, flower_name(celery), COMPONENT, None),
        spec: Some(ServiceSpec {
            type_: Some(
                flower
                    .service_type
                    .unwrap_or(ServiceType::ClusterIP)
                    .as_str()
                    .into(),
            ),
            selector: Some(selector_labels(celery, COMPONENT, None)),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: flower.port,
                target_port: Some(IntOrString::String(PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn ingress(celery: &Celery, spec: &FlowerIngress) -> Ingress {
    let mut metadata = child_meta(celery, flower_name(celery), COMPONENT, None);
    metadata.annotations = non_empty_map(spec.annotations.clone());
    Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: spec.class_name.clone(),
            rules: Some(vec![IngressRule {
                host: Some(spec.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some(spec.path.clone()),
                        path_type: "Prefix".into(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: flower_name(celery),
                                port: Some(ServiceBackendPort {
                                    name: Some(PORT_NAME.into()),
                                    number: None,
                                }),
                            }),
                            resource: None,
                        },
                    }],
                }),
            }]),
            tls: spec.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: Some(vec![spec.host.clone()]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            default_backend: None,
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired_children;
    use crate::desired::tests::{FULL, celery, find};
    use serde_json::json;

    #[test]
    fn flower_serves_its_port_with_basic_auth_from_a_secret() {
        let children = desired_children(&celery(FULL));
        let d = find(&children, ChildKind::Deployment, "demo-flower");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["args"],
            json!(["-A", "proj.celery:app", "flower", "--port=5555"])
        );
        assert_eq!(c["ports"][0]["containerPort"], 5555);
        let auth = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == BASIC_AUTH_ENV)
            .unwrap();
        assert_eq!(
            auth["valueFrom"]["secretKeyRef"],
            json!({"name": "flower-auth", "key": "auth"})
        );
        assert_eq!(d["spec"]["replicas"], 1);
    }

    #[test]
    fn service_targets_flower_pods_and_ingress_targets_service() {
        let children = desired_children(&celery(FULL));
        let d = find(&children, ChildKind::Deployment, "demo-flower");
        let s = find(&children, ChildKind::Service, "demo-flower");
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["selector"], d["spec"]["selector"]["matchLabels"]);
        assert_eq!(s["spec"]["ports"][0]["port"], 5555);
        let i = find(&children, ChildKind::Ingress, "demo-flower");
        let backend = &i["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
        assert_eq!(backend["name"], "demo-flower");
        assert_eq!(backend["port"]["name"], s["spec"]["ports"][0]["name"]);
        assert_eq!(i["spec"]["rules"][0]["host"], "flower.example.com");
        assert_eq!(
            i["spec"]["tls"][0],
            json!({"hosts": ["flower.example.com"], "secretName": "flower-tls"})
        );
    }
}
