//! The committed CRD must be exactly what the Rust types generate.

use kube::CustomResourceExt;

use celery_operator::crd::Celery;

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/celeries.celeryproject.org.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = serde_saphyr::to_string(&Celery::crd()).unwrap();
    assert!(
        committed == generated,
        "crds/celeries.celeryproject.org.yaml is out of date with host/src/crd.rs; regenerate it with\n  \
         cargo run -p celery-operator -- crd > crds/celeries.celeryproject.org.yaml"
    );
}

#[test]
fn the_chart_ships_the_same_crd() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let generated =
        std::fs::read_to_string(format!("{root}/crds/celeries.celeryproject.org.yaml")).unwrap();
    let chart = std::fs::read_to_string(format!(
        "{root}/charts/celery-operator/crds/celeries.celeryproject.org.yaml"
    ))
    .unwrap_or_default();
    assert!(
        chart == generated,
        "charts/celery-operator/crds/ is out of date; copy crds/celeries.celeryproject.org.yaml there"
    );
}

#[test]
fn crd_serves_v1alpha1_with_status_and_short_name() {
    let crd = Celery::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("celeries.celeryproject.org")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["cel".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready", "Workers", "Flower", "Beat", "Reason", "Wait", "Age"
        ]
    );
}

#[test]
fn the_python_sdk_carries_the_wit() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let wit = std::fs::read_to_string(format!("{root}/wit/celery-operator.wit")).unwrap();
    let copy = std::fs::read_to_string(format!(
        "{root}/plugins/python/celery_operator_plugin/wit/celery-operator.wit"
    ))
    .unwrap_or_default();
    assert!(
        copy == wit,
        "plugins/python/celery_operator_plugin/wit/ is out of date; copy wit/celery-operator.wit there"
    );
}
