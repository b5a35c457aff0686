//! Field ownership for server-side apply, approximated: a manager owns a set of field paths;
//! objects are merged field by field; lists are atomic unless they are list-maps (a CRD's
//! `x-kubernetes-list-type: map`, or a few built-in fields merged by key, see
//! [`BUILTIN_LIST_KEYS`]), whose items are merged and owned by their keys. Sets
//! (`x-kubernetes-list-type: set`) are treated as atomic lists.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// One step of a field path: an object field, or a list-map item by its key values (JSON).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    /// An object field.
    Field(String),
    /// A list-map item, by the JSON object of its key fields.
    Key(String),
}

/// A field path.
pub type Path = Vec<Seg>;
/// Fields owned by each manager.
pub type Managers = BTreeMap<String, (String, BTreeSet<Path>)>;

/// Built-in list fields merged by key (from the Kubernetes OpenAPI list-map keys).
pub const BUILTIN_LIST_KEYS: [(&str, &[&str]); 8] = [
    ("containers", &["name"]),
    ("initContainers", &["name"]),
    ("env", &["name"]),
    ("volumes", &["name"]),
    ("volumeMounts", &["mountPath"]),
    ("ownerReferences", &["uid"]),
    ("conditions", &["type"]),
    ("imagePullSecrets", &["name"]),
];

/// Metadata fields managers can own; the rest are the server's.
const OWNED_METADATA: [&str; 4] = ["labels", "annotations", "ownerReferences", "finalizers"];

/// The schema of the field at `path` below `schema`.
fn sub_schema<'a>(schema: Option<&'a Value>, seg: &Seg) -> Option<&'a Value> {
    let schema = schema?;
    match seg {
        Seg::Field(f) => schema["properties"]
            .get(f)
            .or_else(|| schema.get("additionalProperties").filter(|v| v.is_object())),
        Seg::Key(_) => schema.get("items"),
    }
}

/// The keys of the list at field `name` with `schema`, if it is a list-map.
fn list_keys(schema: Option<&Value>, name: Option<&str>) -> Option<Vec<String>> {
    if let Some(s) = schema {
        if s["x-kubernetes-list-type"] == "map" {
            return s["x-kubernetes-list-map-keys"].as_array().map(|k| {
                k.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            });
        }
        if s.get("x-kubernetes-list-type").is_some() {
            return None;
        }
    }
    let name = name?;
    BUILTIN_LIST_KEYS
        .iter()
        .find(|(field, _)| *field == name)
        .map(|(_, keys)| keys.iter().map(|k| k.to_string()).collect())
}

fn key_of(item: &Value, keys: &[String]) -> String {
    let mut key = Map::new();
    for k in keys {
        key.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(key).to_string()
}

/// The fields of `object` a manager owns by sending it (metadata restricted to labels,
/// annotations, owner references and finalizers; apiVersion and kind not owned).
pub fn owned_fields(object: &Value, schema: Option<&Value>) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(map) = object.as_object() else {
        return out;
    };
    for (k, v) in map {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for f in OWNED_METADATA {
                    if let Some(v) = v.get(f) {
                        let path = vec![Seg::Field("metadata".into()), Seg::Field(f.into())];
                        leaves(v, None, Some(f), path, &mut out);
                    }
                }
            }
            _ => {
                let seg = Seg::Field(k.clone());
                let s = sub_schema(schema, &seg);
                leaves(v, s, Some(k), vec![seg], &mut out);
            }
        }
    }
    out
}

fn leaves(
    v: &Value,
    schema: Option<&Value>,
    name: Option<&str>,
    path: Path,
    out: &mut BTreeSet<Path>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let seg = Seg::Field(k.clone());
                let s = sub_schema(schema, &seg);
                let mut p = path.clone();
                p.push(seg);
                leaves(child, s, Some(k), p, out);
            }
        }
        Value::Array(items) => match list_keys(schema, name) {
            Some(keys) if !items.is_empty() => {
                for item in items {
                    let seg = Seg::Key(key_of(item, &keys));
                    let s = sub_schema(schema, &seg);
                    let mut p = path.clone();
                    p.push(seg);
                    // The item itself, so that dropping it from an apply removes it whole.
                    out.insert(p.clone());
                    leaves(item, s, None, p, out);
                }
            }
            _ => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// The value at `path`.
pub fn get<'a>(v: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(v);
    };
    let next = match first {
        Seg::Field(f) => v.get(f)?,
        Seg::Key(k) => {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            v.as_array()?.iter().find(|item| {
                key.iter()
                    .all(|(kk, kv)| item.get(kk).unwrap_or(&Value::Null) == kv)
            })?
        }
    };
    get(next, rest)
}

/// Removes the field at `path`, if present.
pub fn remove(v: &mut Value, path: &[Seg]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parent {
        let next = match seg {
            Seg::Field(f) => cur.get_mut(f),
            Seg::Key(k) => {
                let key: Map<String, Value> = match serde_json::from_str(k) {
                    Ok(key) => key,
                    Err(_) => return,
                };
                cur.as_array_mut().and_then(|items| {
                    items.iter_mut().find(|item| {
                        key.iter()
                            .all(|(kk, kv)| item.get(kk).unwrap_or(&Value::Null) == kv)
                    })
                })
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Seg::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        Seg::Key(k) => {
            if let (Ok(key), Some(items)) = (
                serde_json::from_str::<Map<String, Value>>(k),
                cur.as_array_mut(),
            ) {
                items.retain(|item| {
                    !key.iter()
                        .all(|(kk, kv)| item.get(kk).unwrap_or(&Value::Null) == kv)
                });
            }
        }
    }
}

/// Merges `applied` into `live`: objects field by field, list-maps item by item (by key),
/// other lists and scalars replaced.
pub fn merge(live: &mut Value, applied: &Value, schema: Option<&Value>, name: Option<&str>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                let s = sub_schema(schema, &Seg::Field(k.clone()));
                match l.get_mut(k) {
                    Some(lv) => merge(lv, av, s, Some(k)),
                    None => {
                        l.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (live @ Value::Array(_), Value::Array(items)) => match list_keys(schema, name) {
            Some(keys) => {
                let s = schema.and_then(|s| s.get("items"));
                let list = live.as_array_mut().expect("matched");
                for item in items {
                    let key = key_of(item, &keys);
                    match list.iter_mut().find(|l| key_of(l, &keys) == key) {
                        Some(l) => merge(l, item, s, None),
                        None => list.push(item.clone()),
                    }
                }
            }
            None => *live = applied.clone(),
        },
        (live, applied) => *live = applied.clone(),
    }
}

/// Server-side apply of `applied` by `manager` onto `live` (which is modified). Returns the
/// conflicting fields (with their owners) when `force` is false and another manager owns a
/// field this apply sets to a different value; nothing is changed then.
pub fn apply(
    live: &mut Value,
    managers: &mut Managers,
    manager: &str,
    applied: &Value,
    schema: Option<&Value>,
    force: bool,
    now: &str,
) -> Result<(), Vec<String>> {
    let fields = owned_fields(applied, schema);
    let mut conflicts = Vec::new();
    for (other, (_, owned)) in managers.iter() {
        if other == manager {
            continue;
        }
        for p in owned.intersection(&fields) {
            if get(live, p) != get(applied, p) && !matches!(p.last(), Some(Seg::Key(_))) {
                conflicts.push(format!("{} (owned by {other})", display(p)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (other, (_, owned)) in managers.iter_mut() {
        if other != manager && force {
            owned.retain(|p| {
                !fields.contains(p)
                    || get(live, p) == get(applied, p)
                    || matches!(p.last(), Some(Seg::Key(_)))
            });
        }
    }
    // Fields this manager owned and no longer applies go, unless someone else owns them.
    let previous = managers
        .get(manager)
        .map(|(_, f)| f.clone())
        .unwrap_or_default();
    let others: BTreeSet<&Path> = managers
        .iter()
        .filter(|(m, _)| m.as_str() != manager)
        .flat_map(|(_, (_, f))| f.iter())
        .collect();
    for p in previous.difference(&fields) {
        if !others.contains(p) && !others.iter().any(|o| o.starts_with(p)) {
            remove(live, p);
        }
    }
    merge(live, applied, schema, None);
    managers.insert(manager.into(), (format!("Apply {now}"), fields));
    managers.retain(|_, (_, f)| !f.is_empty());
    Ok(())
}

/// After a non-apply write by `manager` (update or patch) from `old` to `new`: the fields it
/// changed become its own, and fields that are gone are nobody's.
pub fn update(
    managers: &mut Managers,
    manager: &str,
    old: &Value,
    new: &Value,
    schema: Option<&Value>,
    now: &str,
) {
    let after = owned_fields(new, schema);
    let changed: BTreeSet<Path> = after
        .iter()
        .filter(|p| get(old, p) != get(new, p))
        .cloned()
        .collect();
    for (_, (_, owned)) in managers.iter_mut() {
        owned.retain(|p| after.contains(p) && !changed.contains(p));
    }
    let entry = managers
        .entry(manager.into())
        .or_insert_with(|| (String::new(), BTreeSet::new()));
    entry.0 = format!("Update {now}");
    entry.1.extend(changed);
    managers.retain(|_, (_, f)| !f.is_empty());
}

fn display(path: &[Seg]) -> String {
    path.iter()
        .map(|s| match s {
            Seg::Field(f) => format!(".{f}"),
            Seg::Key(k) => format!("[{k}]"),
        })
        .collect()
}

/// `metadata.managedFields` in Kubernetes' FieldsV1 form.
pub fn managed_fields(
    managers: &Managers,
    api_version: &str,
    subresource_of: impl Fn(&Path) -> bool,
) -> Value {
    let mut out = Vec::new();
    for (manager, (what, fields)) in managers {
        let (operation, time) = what.split_once(' ').unwrap_or((what.as_str(), ""));
        for status in [false, true] {
            let mut tree = json!({});
            let mut any = false;
            for p in fields.iter().filter(|p| subresource_of(p) == status) {
                any = true;
                let mut node = &mut tree;
                for seg in p {
                    let key = match seg {
                        Seg::Field(f) => format!("f:{f}"),
                        Seg::Key(k) => format!("k:{k}"),
                    };
                    node = node
                        .as_object_mut()
                        .expect("objects only")
                        .entry(key)
                        .or_insert_with(|| json!({}));
                }
            }
            if any {
                let mut entry = json!({"manager": manager, "operation": operation, "apiVersion": api_version,
                                       "time": time, "fieldsType": "FieldsV1", "fieldsV1": tree});
                if status {
                    entry["subresource"] = json!("status");
                }
                out.push(entry);
            }
        }
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_managers_share_a_list_map_by_key() {
        let schema = json!({"properties": {"status": {"properties": {"scaling": {
            "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["pool"],
            "items": {"type": "object"}}}}}});
        let mut live = json!({"status": {}});
        let mut m = Managers::new();
        let a = json!({"status": {"scaling": [{"pool": "a", "n": 1}]}});
        let b = json!({"status": {"scaling": [{"pool": "b", "n": 2}]}});
        apply(&mut live, &mut m, "ma", &a, Some(&schema), false, "t").unwrap();
        apply(&mut live, &mut m, "mb", &b, Some(&schema), false, "t").unwrap();
        assert_eq!(live["status"]["scaling"].as_array().unwrap().len(), 2);
        // ma stops applying its item: it goes, b's stays.
        apply(
            &mut live,
            &mut m,
            "ma",
            &json!({"status": {"scaling": []}}),
            Some(&schema),
            false,
            "t",
        )
        .unwrap();
        assert_eq!(live["status"]["scaling"], json!([{"pool": "b", "n": 2}]));
    }

    #[test]
    fn a_field_another_manager_owns_conflicts_unless_forced() {
        let mut live = json!({});
        let mut m = Managers::new();
        apply(
            &mut live,
            &mut m,
            "one",
            &json!({"spec": {"replicas": 1, "x": 1}}),
            None,
            false,
            "t",
        )
        .unwrap();
        let err = apply(
            &mut live,
            &mut m,
            "two",
            &json!({"spec": {"replicas": 2}}),
            None,
            false,
            "t",
        )
        .unwrap_err();
        assert!(err[0].contains(".spec.replicas (owned by one)"), "{err:?}");
        apply(
            &mut live,
            &mut m,
            "two",
            &json!({"spec": {"replicas": 2}}),
            None,
            true,
            "t",
        )
        .unwrap();
        assert_eq!(live["spec"]["replicas"], 2);
        // "one" lost replicas: applying without it keeps two's value; x is dropped.
        apply(
            &mut live,
            &mut m,
            "one",
            &json!({"spec": {}}),
            None,
            false,
            "t",
        )
        .unwrap();
        assert_eq!(live, json!({"spec": {"replicas": 2}}));
    }

    #[test]
    fn containers_merge_by_name_and_args_are_atomic() {
        let mut live =
            json!({"spec": {"containers": [{"name": "a", "args": ["x", "y"]}, {"name": "b"}]}});
        merge(
            &mut live,
            &json!({"spec": {"containers": [{"name": "a", "args": ["z"]}]}}),
            None,
            None,
        );
        assert_eq!(
            live["spec"]["containers"],
            json!([{"name": "a", "args": ["z"]}, {"name": "b"}])
        );
    }
}
