//! Structural-schema handling of custom resources, as the API server does it before storing:
//! unknown fields are pruned (unless `x-kubernetes-preserve-unknown-fields`), then types,
//! `required`, `enum`, numeric bounds, string lengths and list sizes are checked. Not
//! checked: `pattern`, `format`, and CEL rules (`x-kubernetes-validations`).

use serde_json::Value;

/// Prunes and validates `object` (a whole custom resource) against `schema`. Returns the
/// field errors, in the API server's `path: message` style.
pub fn check(object: &mut Value, schema: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    if let Some(map) = object.as_object_mut() {
        for (k, v) in map.iter_mut() {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(s) = schema["properties"].get(k) {
                walk(v, s, k, &mut errors)
            }
        }
        if schema.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true)) {
            let known = |k: &str| {
                matches!(k, "apiVersion" | "kind" | "metadata")
                    || schema["properties"].get(k).is_some()
            };
            map.retain(|k, _| known(k));
        }
        required(map, schema, "", &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn required(
    map: &serde_json::Map<String, Value>,
    schema: &Value,
    path: &str,
    errors: &mut Vec<String>,
) {
    for r in schema["required"].as_array().into_iter().flatten() {
        if let Some(r) = r.as_str()
            && !map.contains_key(r)
        {
            let at = if path.is_empty() {
                r.to_string()
            } else {
                format!("{path}.{r}")
            };
            errors.push(format!("{at}: Required value"));
        }
    }
}

fn walk(v: &mut Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != true {
            errors.push(format!("{path}: Invalid value: \"null\": must not be null"));
        }
        return;
    }
    let int_or_string = schema["x-kubernetes-int-or-string"] == true;
    let ok = match schema["type"].as_str() {
        _ if int_or_string => v.is_i64() || v.is_u64() || v.is_string(),
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!(
            "{path}: Invalid value: {}: {path} in body must be of type {}",
            short(v),
            schema["type"].as_str().unwrap_or("int-or-string")
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        errors.push(format!("{path}: Unsupported value: {}", short(v)));
    }
    if let Some(n) = v.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m) {
            errors.push(format!(
                "{path}: Invalid value: {n}: should be greater than or equal to {}",
                schema["minimum"]
            ));
        }
        if schema["maximum"].as_f64().is_some_and(|m| n > m) {
            errors.push(format!(
                "{path}: Invalid value: {n}: should be less than or equal to {}",
                schema["maximum"]
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
            errors.push(format!(
                "{path}: Too long: may not be more than {} bytes",
                schema["maxLength"]
            ));
        }
        if schema["minLength"].as_u64().is_some_and(|m| len < m) {
            errors.push(format!(
                "{path}: Invalid value: {}: should be at least {} chars long",
                short(v),
                schema["minLength"]
            ));
        }
    }
    match v {
        Value::Array(items) => {
            let len = items.len() as u64;
            if schema["maxItems"].as_u64().is_some_and(|m| len > m) {
                errors.push(format!(
                    "{path}: Too many: {len}: must have at most {} items",
                    schema["maxItems"]
                ));
            }
            if schema["minItems"].as_u64().is_some_and(|m| len < m) {
                errors.push(format!(
                    "{path}: Invalid value: {len}: should have at least {} items",
                    schema["minItems"]
                ));
            }
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item, s, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            let props = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if props.is_some() || additional.is_some() || !preserve {
                map.retain(|k, _| {
                    preserve || props.is_some_and(|p| p.contains_key(k)) || additional.is_some()
                });
            }
            for (k, child) in map.iter_mut() {
                let s = props.and_then(|p| p.get(k)).or(additional);
                if let Some(s) = s {
                    walk(child, s, &format!("{path}.{k}"), errors);
                }
            }
            required(map, schema, path, errors);
        }
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_pruned_and_types_checked() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["n"],
            "properties": {"n": {"type": "integer", "minimum": 1}, "free": {"type": "object",
            "x-kubernetes-preserve-unknown-fields": true}}}}});
        let mut ok = json!({"spec": {"n": 2, "junk": 1, "free": {"any": 1}}, "other": 1});
        check(&mut ok, &schema).unwrap();
        assert_eq!(ok, json!({"spec": {"n": 2, "free": {"any": 1}}}));
        let mut bad = json!({"spec": {"n": "two"}});
        assert!(check(&mut bad, &schema).unwrap_err()[0].contains("spec.n"));
        let mut missing = json!({"spec": {}});
        assert_eq!(
            check(&mut missing, &schema).unwrap_err(),
            ["spec.n: Required value"]
        );
        let mut low = json!({"spec": {"n": 0}});
        assert!(check(&mut low, &schema).is_err());
    }
}
