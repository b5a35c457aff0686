use kube::CustomResourceExt;
fn main() {
    print!(
        "{}",
        serde_saphyr::to_string(&celery_operator::crd::Celery::crd()).unwrap()
    );
}
