//! Unit tests of the KEDA objects.

use super::*;
use celery_operator_plugin_sdk::serde_json::{self, Value, json};

const REDIS: &str = r#"{"metadata":{"name":"app"},"spec":{"broker":{"secretRef":{"name":"app-broker","key":"url"},"type":"redis"}}}"#;
const RABBITMQ: &str = r#"{"metadata":{"name":"app"},"spec":{"broker":{"secretRef":{"name":"app-broker","key":"url"},"type":"rabbitmq"}}}"#;
const UNTYPED: &str = r#"{"metadata":{"name":"app"},"spec":{"broker":{"secretRef":{"name":"app-broker","key":"url"}}}}"#;
const QUEUE_5: &str = r#"{"minReplicas":0,"maxReplicas":10,"metrics":[{"name":"taskQueueLength","target":{"type":"AverageValue","averageValue":"5"}}]}"#;

fn input(celery: &str, autoscaling: &str, queues: &[&str], settings: &str) -> PoolInput {
    PoolInput {
        celery: celery.into(),
        pool: "default".into(),
        deployment: "app-worker-default".into(),
        autoscaling: autoscaling.into(),
        queues: queues.iter().map(|q| q.to_string()).collect(),
        settings: settings.into(),
    }
}

fn objects(i: PoolInput) -> Result<Vec<Value>, String> {
    Keda::objects(i).map(|objs| {
        objs.iter()
            .map(|o| serde_json::from_str(o).unwrap())
            .collect()
    })
}

#[test]
fn redis_one_trigger_per_list() {
    let objs = objects(input(REDIS, QUEUE_5, &["celery", "mail"], "{}")).unwrap();
    assert_eq!(objs.len(), 2);
    let so = &objs[0];
    assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(so["kind"], "ScaledObject");
    assert_eq!(so["metadata"], json!({"name": "app-worker-default"}));
    let spec = &so["spec"];
    assert_eq!(
        spec["scaleTargetRef"],
        json!({"name": "app-worker-default"})
    );
    assert_eq!(spec["minReplicaCount"], 0);
    assert_eq!(spec["maxReplicaCount"], 10);
    assert_eq!(spec["pollingInterval"], 30);
    assert_eq!(spec["cooldownPeriod"], 300);
    assert_eq!(
        spec["fallback"],
        json!({"failureThreshold": 3, "replicas": 1})
    );
    let triggers = spec["triggers"].as_array().unwrap();
    let lists: Vec<&str> = triggers
        .iter()
        .map(|t| t["metadata"]["listName"].as_str().unwrap())
        .collect();
    assert_eq!(
        lists,
        [
            "celery",
            "celery\u{6}\u{16}3",
            "celery\u{6}\u{16}6",
            "celery\u{6}\u{16}9",
            "mail",
            "mail\u{6}\u{16}3",
            "mail\u{6}\u{16}6",
            "mail\u{6}\u{16}9",
        ]
    );
    assert_eq!(
        triggers[1],
        json!({
            "type": "redis",
            "metricType": "AverageValue",
            "metadata": {"listName": "celery\u{6}\u{16}3", "listLength": "5", "databaseIndex": "0"},
            "authenticationRef": {"name": "app-worker-default"},
            "name": "q1",
        })
    );
    // KEDA takes the maximum over triggers: a scaling modifier sums them.
    assert_eq!(
        spec["advanced"]["scalingModifiers"],
        json!({"formula": "q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7", "target": "5",
               "metricType": "AverageValue"})
    );
    // The separator travels as JSON escapes.
    assert!(
        Keda::objects(input(REDIS, QUEUE_5, &["celery"], "{}")).unwrap()[0]
            .contains(r#""celery\u0006\u00163""#)
    );
    assert_eq!(
        objs[1],
        json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "app-worker-default"},
            "spec": {"secretTargetRef": [
                {"parameter": "address", "name": "app-broker", "key": "address"},
                {"parameter": "password", "name": "app-broker", "key": "password"},
            ]},
        })
    );
    // Nothing the host owns.
    for o in &objs {
        assert_eq!(o["metadata"].as_object().unwrap().len(), 1);
    }
}

#[test]
fn redis_lists_are_named_as_kombu_writes_them() {
    let celery = r#"{"spec":{"broker":{"secretRef":{"name":"app-broker","key":"url"},"type":"redis",
        "redis":{"globalKeyprefix":"shop:","sep":":","prioritySteps":[0,5]}}}}"#;
    let objs = objects(input(celery, QUEUE_5, &["celery"], "{}")).unwrap();
    let lists: Vec<&str> = objs[0]["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["metadata"]["listName"].as_str().unwrap())
        .collect();
    assert_eq!(lists, ["shop:celery", "shop:celery:5"]);
    // One queue without priority steps: one trigger, nothing to sum.
    let celery = celery.replace("[0,5]", "[0]");
    let objs = objects(input(&celery, QUEUE_5, &["celery"], "{}")).unwrap();
    assert_eq!(objs[0]["spec"]["triggers"].as_array().unwrap().len(), 1);
    assert!(objs[0]["spec"].get("advanced").is_none());
}

#[test]
fn redis_settings() {
    let celery = r#"{"spec":{"broker":{"secretRef":{"name":"app-broker","key":"url"},"type":"redis",
        "redis":{"sep":":","prioritySteps":[0,5]}}}}"#;
    let objs = objects(input(
        celery,
        QUEUE_5,
        &["celery"],
        r#"{"databaseIndex": 2,
            "addressKey": "host", "passwordKey": null, "pollingInterval": 10,
            "cooldownPeriod": 60, "fallback": {"failureThreshold": 5, "replicas": 4}}"#,
    ))
    .unwrap();
    let spec = &objs[0]["spec"];
    assert_eq!(spec["pollingInterval"], 10);
    assert_eq!(spec["cooldownPeriod"], 60);
    assert_eq!(
        spec["fallback"],
        json!({"failureThreshold": 5, "replicas": 4})
    );
    let triggers = spec["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 2);
    assert_eq!(triggers[1]["metadata"]["listName"], "celery:5");
    assert_eq!(triggers[1]["metadata"]["databaseIndex"], "2");
    assert_eq!(
        objs[1]["spec"]["secretTargetRef"],
        json!([{"parameter": "address", "name": "app-broker", "key": "host"}])
    );
}

#[test]
fn fallback_defaults_to_min_replicas_and_can_be_left_out() {
    let a = r#"{"minReplicas":3,"maxReplicas":10,"metrics":[{"name":"taskQueueLength","target":{"type":"AverageValue","averageValue":"5"}}]}"#;
    let objs = objects(input(REDIS, a, &["celery"], "{}")).unwrap();
    assert_eq!(objs[0]["spec"]["fallback"]["replicas"], 3);
    let objs = objects(input(REDIS, a, &["celery"], r#"{"fallback": null}"#)).unwrap();
    assert!(objs[0]["spec"].get("fallback").is_none());
}

#[test]
fn rabbitmq_one_trigger_per_queue() {
    let objs = objects(input(RABBITMQ, QUEUE_5, &["celery", "mail"], "{}")).unwrap();
    let triggers = objs[0]["spec"]["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 2);
    // Through the management API: ready and unacknowledged messages, as the operator's own
    // scaler counts them. The broker URL (amqp://, pyamqp://) is never given to KEDA.
    assert_eq!(
        triggers[1],
        json!({
            "type": "rabbitmq",
            "metricType": "AverageValue",
            "metadata": {"protocol": "http", "queueName": "mail", "mode": "QueueLength", "value": "5"},
            "authenticationRef": {"name": "app-worker-default"},
            "name": "q1",
        })
    );
    assert_eq!(
        objs[1]["spec"],
        json!({"secretTargetRef": [
            {"parameter": "username", "name": "app-broker", "key": "username"},
            {"parameter": "password", "name": "app-broker", "key": "password"},
            {"parameter": "host", "name": "app-broker", "key": "management-url"},
        ]})
    );
    // With the management URL in the resource, KEDA gets it from there.
    let celery = RABBITMQ.replace(
        r#""type":"rabbitmq""#,
        r#""type":"rabbitmq","rabbitmq":{"managementUrl":"http://rabbitmq:15672"}"#,
    );
    let objs = objects(input(
        &celery,
        QUEUE_5,
        &["celery"],
        r#"{"vhostName": "shop"}"#,
    ))
    .unwrap();
    let metadata = &objs[0]["spec"]["triggers"][0]["metadata"];
    assert_eq!(metadata["host"], "http://rabbitmq:15672");
    assert_eq!(metadata["vhostName"], "shop");
    assert_eq!(
        objs[1]["spec"]["secretTargetRef"].as_array().unwrap().len(),
        2
    );
}

#[test]
fn cpu_and_memory_triggers() {
    let a = r#"{"minReplicas":1,"maxReplicas":10,"metrics":[
        {"name":"cpu","target":{"type":"Utilization","averageUtilization":70}},
        {"name":"memory","target":{"type":"AverageValue","averageValue":"512Mi"}}]}"#;
    // No broker needed (UNTYPED), no TriggerAuthentication, no fallback (KEDA rejects one
    // next to cpu/memory triggers).
    let objs = objects(input(UNTYPED, a, &["celery"], "{}")).unwrap();
    assert_eq!(objs.len(), 1);
    assert_eq!(
        objs[0]["spec"]["triggers"],
        json!([
            {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}},
            {"type": "memory", "metricType": "AverageValue", "metadata": {"value": "512Mi"}},
        ])
    );
    assert!(objs[0]["spec"].get("fallback").is_none());
}

#[test]
fn mixed_metrics() {
    let a = r#"{"minReplicas":1,"maxReplicas":10,"metrics":[
        {"name":"cpu","target":{"type":"Utilization","averageUtilization":70}},
        {"name":"taskQueueLength","target":{"type":"AverageValue","averageValue":"5"}}]}"#;
    let objs = objects(input(RABBITMQ, a, &["celery"], "{}")).unwrap();
    assert_eq!(objs.len(), 2);
    let types: Vec<&str> = objs[0]["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["cpu", "rabbitmq"]);
    assert!(objs[0]["spec"].get("fallback").is_none());
}

#[test]
fn behavior_goes_to_the_hpa_keda_creates() {
    let a = r#"{"minReplicas":1,"maxReplicas":10,"metrics":[{"name":"cpu","target":{"type":"Utilization","averageUtilization":70}}],
        "behavior":{"scaleUp":{"policies":[{"type":"Pods","value":2,"periodSeconds":60}]}}}"#;
    let objs = objects(input(UNTYPED, a, &[], "{}")).unwrap();
    assert_eq!(
        objs[0]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["policies"]
            [0]["value"],
        2
    );
}

#[test]
fn broker_type_is_needed_for_queue_length() {
    let err = objects(input(UNTYPED, QUEUE_5, &["celery"], "{}")).unwrap_err();
    assert_eq!(
        err,
        "spec.broker.type is not set: the keda autoscaler needs it (redis or rabbitmq) to \
         build taskQueueLength triggers"
    );
    let sqs = REDIS.replace("\"redis\"", "\"sqs\"");
    let err = objects(input(&sqs, QUEUE_5, &["celery"], "{}")).unwrap_err();
    assert!(
        err.starts_with("spec.broker.type: \"sqs\" is not supported"),
        "{err}"
    );
}

#[test]
fn errors() {
    let cpu_only_zero = r#"{"minReplicas":0,"maxReplicas":10,"metrics":[{"name":"cpu","target":{"type":"Utilization","averageUtilization":70}}]}"#;
    let err = objects(input(REDIS, cpu_only_zero, &["celery"], "{}")).unwrap_err();
    assert!(
        err.starts_with("autoscaling.minReplicas: KEDA cannot scale to zero"),
        "{err}"
    );
    let err = objects(input(REDIS, QUEUE_5, &[], "{}")).unwrap_err();
    assert_eq!(
        err,
        "pool \"default\" has no queues to measure for taskQueueLength"
    );
    let fractional = QUEUE_5.replace("\"5\"", "\"2.5\"");
    let err = objects(input(REDIS, &fractional, &["celery"], "{}")).unwrap_err();
    assert_eq!(
        err,
        "autoscaling.metrics[0].target.averageValue: \"2.5\" is not a whole number of tasks \
         above 0 (KEDA's redis scaler)"
    );
    assert!(objects(input(RABBITMQ, &fractional, &["celery"], "{}")).is_ok());
    let err = objects(input(
        REDIS,
        QUEUE_5,
        &["celery"],
        r#"{"polingInterval": 5}"#,
    ))
    .unwrap_err();
    assert!(
        err.starts_with("settings.polingInterval: unknown field"),
        "{err}"
    );
    let err = objects(input(
        REDIS,
        QUEUE_5,
        &["celery"],
        r#"{"fallback": {"replicas": "two"}}"#,
    ))
    .unwrap_err();
    assert!(
        err.starts_with("settings.fallback.replicas: invalid type"),
        "{err}"
    );
    let err = objects(input("{}", QUEUE_5, &["celery"], "{}")).unwrap_err();
    assert!(err.starts_with("celery: missing field `spec`"), "{err}");
}
