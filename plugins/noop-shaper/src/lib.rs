//! `noop-shaper`: a shaper plugin that returns the objects it is given, unchanged.
//!
//! Useful as the smallest possible shaper, to check that a cluster's plugin pipeline
//! works, and as a template.

use celery_operator_plugin_sdk::shaper::{Guest, ShapeInput};

/// The plugin.
pub struct NoopShaper;

impl Guest for NoopShaper {
    fn shape(input: ShapeInput) -> Result<Vec<String>, String> {
        Ok(input.objects)
    }
}

celery_operator_plugin_sdk::export_shaper!(NoopShaper);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_objects_unchanged() {
        let objects = vec![r#"{"kind":"Deployment"}"#.to_string(), "{}".to_string()];
        let out = NoopShaper::shape(ShapeInput {
            celery: "{}".into(),
            objects: objects.clone(),
            settings: "{}".into(),
        })
        .unwrap();
        assert_eq!(out, objects);
    }
}
