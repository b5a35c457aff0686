//! A container's environment and command line as a kubelet makes them: `env` with
//! `secretKeyRef`, `configMapKeyRef` and `fieldRef`, `envFrom`, and `$(VAR)` in the command
//! and arguments. Pure: the Secrets and ConfigMaps it reads are handed in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;

/// The data of the Secrets and ConfigMaps a container refers to, by name.
#[derive(Debug, Default)]
pub struct Sources {
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Sources {
    /// The names of the Secrets and of the ConfigMaps `container` refers to.
    pub fn wanted(container: &Container) -> (Vec<String>, Vec<String>) {
        let mut secrets = Vec::new();
        let mut config_maps = Vec::new();
        for from in container.env_from.iter().flatten() {
            if let Some(s) = &from.secret_ref {
                secrets.push(s.name.clone());
            }
            if let Some(c) = &from.config_map_ref {
                config_maps.push(c.name.clone());
            }
        }
        for var in container.env.iter().flatten() {
            let Some(from) = &var.value_from else {
                continue;
            };
            if let Some(s) = &from.secret_key_ref {
                secrets.push(s.name.clone());
            }
            if let Some(c) = &from.config_map_key_ref {
                config_maps.push(c.name.clone());
            }
        }
        secrets.sort();
        secrets.dedup();
        config_maps.sort();
        config_maps.dedup();
        (secrets, config_maps)
    }
}

/// The pod a container runs in, as `fieldRef` sees it.
pub struct PodFields<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// The environment of `container` (in order; a later variable of the same name wins, as in
/// Kubernetes), or why it cannot start (a missing Secret or key that is not optional).
pub fn environment(
    container: &Container,
    pod: &PodFields,
    sources: &Sources,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = vec![("HOSTNAME".into(), pod.name.into())];
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        let (data, name, optional, what) = if let Some(s) = &from.secret_ref {
            (sources.secrets.get(&s.name), &s.name, s.optional, "Secret")
        } else if let Some(c) = &from.config_map_ref {
            (
                sources.config_maps.get(&c.name),
                &c.name,
                c.optional,
                "ConfigMap",
            )
        } else {
            continue;
        };
        match data {
            Some(data) => env.extend(
                data.iter()
                    .map(|(k, v)| (format!("{prefix}{k}"), v.clone())),
            ),
            None if optional == Some(true) => {}
            None => return Err(format!("{what} {name:?} not found")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => Some(expand(var.value.as_deref().unwrap_or(""), &env)),
            Some(from) => {
                if let Some(r) = &from.secret_key_ref {
                    key(&sources.secrets, &r.name, &r.key, r.optional, "Secret")?
                } else if let Some(r) = &from.config_map_key_ref {
                    key(
                        &sources.config_maps,
                        &r.name,
                        &r.key,
                        r.optional,
                        "ConfigMap",
                    )?
                } else if let Some(f) = &from.field_ref {
                    Some(match f.field_path.as_str() {
                        "metadata.name" => pod.name.to_string(),
                        "metadata.namespace" => pod.namespace.to_string(),
                        "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
                        other => return Err(format!("fieldRef {other:?} is not supported")),
                    })
                } else {
                    return Err(format!(
                        "env {:?}: resourceFieldRef is not supported",
                        var.name
                    ));
                }
            }
        };
        if let Some(value) = value {
            env.push((var.name.clone(), value));
        }
    }
    Ok(env)
}

fn key(
    sources: &BTreeMap<String, BTreeMap<String, String>>,
    name: &str,
    key: &str,
    optional: Option<bool>,
    what: &str,
) -> Result<Option<String>, String> {
    match sources.get(name).and_then(|data| data.get(key)) {
        Some(value) => Ok(Some(value.clone())),
        None if optional == Some(true) => Ok(None),
        None => Err(format!("{what} {name:?} has no key {key:?}")),
    }
}

/// `text` with each `$(VAR)` replaced by the value of `VAR` in `env` (left as it is when
/// there is no such variable) and `$$` by `$`, as Kubernetes expands commands, arguments
/// and values.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
        {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(spec: serde_json::Value) -> Container {
        serde_json::from_value(spec).unwrap()
    }

    fn sources() -> Sources {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Sources {
            secrets: [(
                "broker".to_string(),
                map(&[("url", "redis://127.0.0.1:1/0")]),
            )]
            .into(),
            config_maps: [("settings".to_string(), map(&[("A", "1"), ("B", "2")]))].into(),
        }
    }

    #[test]
    fn the_environment_resolves_references_like_a_kubelet() {
        let c = container(json!({
            "name": "worker",
            "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "S_"},
                        {"secretRef": {"name": "missing", "optional": true}}],
            "env": [
                {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "WHERE", "value": "$(POD) in $(NS) costs $$5"},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "x", "optional": true}}},
            ],
        }));
        assert_eq!(
            Sources::wanted(&c),
            (
                vec!["broker".to_string(), "missing".to_string()],
                vec!["settings".to_string()]
            )
        );
        let pod = PodFields {
            name: "w-1",
            namespace: "default",
        };
        let env = environment(&c, &pod, &sources()).unwrap();
        let get = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("HOSTNAME"), Some("w-1"));
        assert_eq!(get("S_A"), Some("1"));
        assert_eq!(get("CELERY_BROKER_URL"), Some("redis://127.0.0.1:1/0"));
        assert_eq!(get("WHERE"), Some("w-1 in $(NS) costs $5"));
        assert_eq!(get("OPT"), None);

        let missing = container(json!({"name": "w", "env": [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "nope"}}}]}));
        assert_eq!(
            environment(&missing, &pod, &sources()).unwrap_err(),
            "Secret \"broker\" has no key \"nope\""
        );
        let no_secret =
            container(json!({"name": "w", "envFrom": [{"secretRef": {"name": "gone"}}]}));
        assert_eq!(
            environment(&no_secret, &pod, &sources()).unwrap_err(),
            "Secret \"gone\" not found"
        );
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$-$", &env), "x-$(B)-$(A)-$-$");
        assert_eq!(expand("$(A", &env), "$(A");
    }
}
