//! Stage 1 of reconciliation: is the spec valid?
//!
//! The API server already enforces the CRD schema and its CEL rules, but a spec can still
//! reach the operator unchecked: read from a file by `render`, or stored under an older CRD
//! with weaker rules. The same CEL rules are therefore evaluated here, client-side, from the
//! very schema the CRD is generated from, so there is one source of truth.

use std::sync::LazyLock;

use kube::CustomResourceExt;
use kube::core::cel::{CompiledSchema, Validator, compile_schema};

use crate::crd::Celery;

/// Why a spec is invalid: one human-readable line per violated rule, with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Celery spec: {}", .0.join("; "))]
pub struct InvalidSpec(pub Vec<String>);

/// The CRD's openAPIV3Schema, as JSON.
static OPENAPI: LazyLock<serde_json::Value> = LazyLock::new(|| {
    let crd = Celery::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the derived CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("schemas serialize")
});

static SCHEMA: LazyLock<CompiledSchema> = LazyLock::new(|| compile_schema(&OPENAPI));

/// Checks a Celery resource against its CRD as an API server would: the schema's types,
/// bounds (`minimum`, `maximum`, lengths, sizes), enums and required fields, and every CEL
/// rule; all errors are reported at once, as the API server does.
pub fn validate(celery: &Celery) -> Result<(), InvalidSpec> {
    let mut object = serde_json::to_value(celery).expect("a Celery resource serializes");
    let mut errors = memory_apiserver::schema::check(&mut object, &OPENAPI)
        .err()
        .unwrap_or_default();
    if let Err(rules) = Validator::new().validate_compiled(&SCHEMA, &object, None) {
        errors.extend(rules.iter().map(ToString::to_string));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::{FULL, celery};

    #[test]
    fn every_rule_of_the_crd_compiles() {
        let errors: Vec<_> = SCHEMA
            .compilation_errors()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn full_example_is_valid() {
        assert_eq!(validate(&celery(FULL)), Ok(()));
    }

    #[test]
    fn the_schemas_bounds_are_checked_as_an_api_server_does() {
        let mut c = celery(FULL);
        c.spec.workers[0].replicas = Some(-1);
        c.spec.workers[0].concurrency = Some(0);
        let errors = validate(&c).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.workers[0].replicas: Invalid value: -1")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.workers[0].concurrency: Invalid value: 0")),
            "{errors:?}"
        );
    }

    /// Each case breaks one rule; the error must name the rule's message.
    #[test]
    fn each_rule_rejects_what_it_should() {
        let cases = [
            (
                "app: proj.celery:app",
                "app: \"proj; rm -rf /\"",
                "app must be a Python module path",
            ),
            (
                "  - name: heavy",
                "  - name: Heavy_Pool",
                "pool name must be a DNS label",
            ),
            (
                "  - name: heavy",
                "  - name: default",
                "worker pool names must be unique",
            ),
            (
                "queues: [reports]",
                "queues: [\"a,b\"]",
                "queue names cannot be empty",
            ),
            (
                "    replicas: 3\n",
                "    replicas: 3\n    autoscaling: {minReplicas: 1, maxReplicas: 2, metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 50}}]}\n",
                "mutually exclusive",
            ),
            (
                "minReplicas: 1",
                "minReplicas: 20",
                "minReplicas must be less than or equal to maxReplicas",
            ),
            (
                "{type: AverageValue, averageValue: \"5\"}",
                "{type: Utilization, averageUtilization: 50}",
                "taskQueueLength supports only an AverageValue target",
            ),
            (
                "{type: AverageValue, averageValue: \"5\"}",
                "{type: AverageValue, averageUtilization: 50}",
                "a Utilization target needs averageUtilization",
            ),
            (
                "timeLimitSeconds: 600",
                "timeLimitSeconds: 600\n    terminationGracePeriodSeconds: 60",
                "terminationGracePeriodSeconds must be at least timeLimitSeconds",
            ),
            (
                "timeLimitSeconds: 600",
                "timeLimitSeconds: 600\n    softTimeLimitSeconds: 600",
                "softTimeLimitSeconds must be less than timeLimitSeconds",
            ),
            (
                "{maxUnavailable: 1}",
                "{maxUnavailable: 1, minAvailable: 1}",
                "set exactly one of minAvailable and maxUnavailable",
            ),
            (
                "celeryVersion: \"5.4\"",
                "celeryVersion: \"5.4+\"",
                "celeryVersion must be usable as a label value",
            ),
            (
                "host: flower.example.com",
                "host: \"flower example\"",
                "host must be a DNS name",
            ),
            (
                "tlsSecretName: flower-tls",
                "tlsSecretName: flower-tls, path: flower",
                "path must start with '/'",
            ),
            (
                "    replicas: 3\n",
                "    replicas: 3\n    rolloutStrategy: {type: Recreate, maxSurge: 1}\n",
                "maxSurge and maxUnavailable apply only",
            ),
            (
                "    replicas: 3\n",
                "    replicas: 3\n    disablePrefetch: true\n",
                "disablePrefetch needs Celery 5.6 or later",
            ),
            (
                "broker: {secretRef: {name: broker, key: url}}",
                "broker: {secretRef: {name: broker, key: url}, redis: {visibilityTimeoutSeconds: 600}}",
                "visibilityTimeoutSeconds must be longer than every pool's termination grace period",
            ),
            (
                "    replicas: 3\n",
                "    replicas: 3\n    shutdown: Soft\n",
                "shutdown: Soft needs Celery 5.5 or later",
            ),
            (
                "    replicas: 3\n",
                "    replicas: 3\n    softShutdownOnIdle: true\n",
                "apply only with shutdown: Soft",
            ),
            (
                "timeLimitSeconds: 600",
                "timeLimitSeconds: 600\n    terminationGracePeriodSeconds: 700\n    shutdown: Warm\n    softShutdownTimeoutSeconds: 5",
                "apply only with shutdown: Soft",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(FULL.contains(from), "test case does not apply: {from}");
            let err = validate(&celery(&FULL.replacen(from, to, 1))).expect_err(expected);
            assert!(
                err.0.iter().any(|m| m.contains(expected)),
                "{expected:?} not in {err}"
            );
            assert_eq!(err.0.len(), 1, "only the broken rule fails: {err}");
        }
    }

    #[test]
    fn disable_prefetch_follows_the_celery_version() {
        let with = |version: &str| {
            let spec = FULL
                .replacen(
                    "celeryVersion: \"5.4\"",
                    &format!("celeryVersion: \"{version}\""),
                    1,
                )
                .replacen(
                    "    replicas: 3\n",
                    "    replicas: 3\n    disablePrefetch: true\n",
                    1,
                );
            validate(&celery(&spec)).is_ok()
        };
        for ok in ["5.6", "5.6.0rc1", "5.10", "6.0", "10.1"] {
            assert!(with(ok), "{ok}");
        }
        for old in ["5.5", "5.5.3", "4.4", "5"] {
            assert!(!with(old), "{old}");
        }
    }

    #[test]
    fn long_names_are_rejected() {
        let mut c = celery(FULL);
        c.metadata.name = Some("x".repeat(51));
        let err = validate(&c).unwrap_err();
        assert!(err.to_string().contains("at most 50 characters"), "{err}");
    }
}
