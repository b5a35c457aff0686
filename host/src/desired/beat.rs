//! Celery beat: exactly one pod, replaced with the `Recreate` strategy so two schedulers
//! never run at once, and never autoscaled.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, Volume, VolumeMount};

use super::{beat_name, celery_container, child_meta, pod_template, selector};
use crate::children::{Child, ChildKind};
use crate::crd::{BeatSpec, Celery};

const COMPONENT: &str = "beat";
const SCHEDULE_VOLUME: &str = "beat-schedule";
const SCHEDULE_DIR: &str = "/var/lib/celery-beat";

/// Beat's Deployment.
pub fn deployment(celery: &Celery, beat: &BeatSpec) -> Child {
    // The schedule file must be writable even with a read-only root filesystem.
    let mut args = vec![
        "beat".to_string(),
        "--schedule".into(),
        format!("{SCHEDULE_DIR}/celerybeat-schedule"),
    ];
    args.extend(beat.args.iter().cloned());
    let mut container = celery_container(celery, COMPONENT, args, &[]);
    container.resources = beat.resources.clone();
    container
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: SCHEDULE_VOLUME.into(),
            mount_path: SCHEDULE_DIR.into(),
            ..Default::default()
        });
    let mut template = pod_template(celery, COMPONENT, None, container);
    template
        .spec
        .as_mut()
        .expect("pod_template sets a spec")
        .volumes
        .get_or_insert_with(Vec::new)
        .push(Volume {
            name: SCHEDULE_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    let deployment = Deployment {
        metadata: child_meta(celery, beat_name(celery), COMPONENT, None),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                rolling_update: None,
            }),
            selector: selector(celery, COMPONENT, None),
            template,
            ..Default::default()
        }),
        status: None,
    };
    Child::new(ChildKind::Deployment, beat_name(celery), &deployment)
}

#[cfg(test)]
mod tests {
    use crate::children::ChildKind;
    use crate::desired::desired_children;
    use crate::desired::tests::{FULL, celery, find};
    use serde_json::json;

    #[test]
    fn beat_is_one_replica_recreate_with_a_writable_schedule() {
        let yaml = FULL.replace("beat: {}", "beat: {args: [--loglevel, INFO]}");
        let children = desired_children(&celery(&yaml));
        let d = find(&children, ChildKind::Deployment, "demo-beat");
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}));
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["args"],
            json!([
                "-A",
                "proj.celery:app",
                "beat",
                "--schedule",
                "/var/lib/celery-beat/celerybeat-schedule",
                "--loglevel",
                "INFO"
            ])
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"][0]["mountPath"],
            "/var/lib/celery-beat"
        );
        assert_eq!(pod["volumes"][0]["emptyDir"], json!({}));
    }
}
