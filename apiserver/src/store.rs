//! The objects, their resource versions, the change history watches replay, and the write
//! semantics: generation, status/main split, preconditions, finalizers, garbage collection.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::fields::{self, Managers, Path, Seg};
use crate::resources::{self, ResourceType};
use crate::schema;
use crate::selectors::{Fields, Labels};

/// An API error, turned into a `Status` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    /// The `Status` object.
    pub fn body(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

fn not_found(t: &ResourceType, name: &str) -> ApiError {
    let what = if t.group.is_empty() {
        t.plural.clone()
    } else {
        format!("{}.{}", t.plural, t.group)
    };
    ApiError::new(404, "NotFound", format!("{what} \"{name}\" not found"))
}

/// Where an object is stored: by group and plural (one stored version), namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    group: String,
    plural: String,
    namespace: String,
    name: String,
}

struct Entry {
    object: Value,
    managers: Managers,
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    group: String,
    plural: String,
    kind: &'static str,
    object: Value,
    /// For MODIFIED: the object before, so that a watch sees an object enter or leave its
    /// selector as ADDED or DELETED, as the API server sends it.
    before: Option<Value>,
}

/// What a watch asked for.
pub struct Watch {
    /// Resource type.
    pub group: String,
    /// Plural.
    pub plural: String,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Label selector.
    pub labels: Labels,
    /// Field selector.
    pub fields: Fields,
}

impl Watch {
    fn matches(&self, object: &Value) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The event this watch gets for `c`, if any.
    fn event(&self, c: &Change) -> Option<Value> {
        if self.group != c.group || self.plural != c.plural {
            return None;
        }
        let now = self.matches(&c.object);
        let kind = match (c.kind, c.before.as_ref().map(|b| self.matches(b))) {
            ("MODIFIED", Some(true)) if !now => "DELETED",
            ("MODIFIED", Some(false)) if now => "ADDED",
            ("MODIFIED", Some(false)) => return None,
            (kind, _) if now => kind,
            _ => return None,
        };
        Some(json!({"type": kind, "object": c.object}))
    }
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The object (status changes ignored when the type has a status subresource).
    Main,
    /// The `status` subresource (only status changes kept).
    Status,
}

/// The whole state of the server.
pub struct Store {
    rv: u64,
    uids: u64,
    /// The served types.
    pub types: Vec<ResourceType>,
    objects: BTreeMap<Key, Entry>,
    history: VecDeque<Change>,
    /// How many changes watches can be replayed from; older versions get 410 Gone.
    pub history_limit: usize,
    watchers: Vec<(Watch, mpsc::UnboundedSender<Value>)>,
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .expect("rounds")
        .to_string()
}

/// DNS-1123 subdomain, as most kinds require of names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// The object without metadata and status: what `generation` tracks.
/// The defaults the API server fills in on every write that the clients of this server rely
/// on: a Deployment without `spec.replicas` gets 1 (owned by no field manager, so an apply
/// that leaves the field out keeps whatever another manager, an autoscaler, set).
fn default_fields(t: &ResourceType, object: &mut Value) {
    if t.group == "apps"
        && t.plural == "deployments"
        && object["spec"].is_object()
        && object["spec"]["replicas"].is_null()
    {
        object["spec"]["replicas"] = json!(1);
    }
}

fn spec_of(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

impl Default for Store {
    fn default() -> Self {
        let mut store = Store {
            rv: 1000,
            uids: 0,
            types: resources::builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: 10_000,
            watchers: Vec::new(),
        };
        for ns in ["default", "kube-system"] {
            let t = store.find("", "namespaces").expect("built-in").clone();
            store
                .create(&t, None, json!({"metadata": {"name": ns}}), None)
                .expect("fresh store");
        }
        store
    }
}

impl Store {
    /// The served type at group/version/plural.
    pub fn served(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    fn find(&self, group: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(t: &ResourceType, ns: Option<&str>, name: &str) -> Key {
        Key {
            group: t.group.clone(),
            plural: t.plural.clone(),
            namespace: ns.unwrap_or_default().into(),
            name: name.into(),
        }
    }

    fn record(
        &mut self,
        t: &ResourceType,
        kind: &'static str,
        object: &Value,
        before: Option<&Value>,
    ) {
        let change = Change {
            rv: self.rv,
            group: t.group.clone(),
            plural: t.plural.clone(),
            kind,
            object: object.clone(),
            before: before.cloned(),
        };
        self.watchers
            .retain(|(w, tx)| w.event(&change).is_none_or(|e| tx.send(e).is_ok()));
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            self.history.pop_front();
        }
    }

    /// Gets one object.
    pub fn get(&self, t: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(t, ns, name))
            .map(|e| self.render(t, e))
            .ok_or_else(|| not_found(t, name))
    }

    fn render(&self, t: &ResourceType, e: &Entry) -> Value {
        let mut o = e.object.clone();
        o["apiVersion"] = json!(t.api_version());
        o["kind"] = json!(t.kind);
        if !e.managers.is_empty() {
            let status = |p: &Path| p.first() == Some(&Seg::Field("status".into()));
            o["metadata"]["managedFields"] =
                fields::managed_fields(&e.managers, &t.api_version(), |p| t.status && status(p));
        }
        o
    }

    /// Lists objects, in namespace/name order, `limit` at a time; `after` is the last key of
    /// the previous page (the continue token). Later pages see the current state, not a
    /// snapshot at the first page's version (an approximation).
    pub fn list(
        &self,
        t: &ResourceType,
        ns: Option<&str>,
        labels: &Labels,
        fields: &Fields,
        limit: Option<usize>,
        after: Option<(String, String)>,
    ) -> (Vec<Value>, Option<(String, String)>) {
        let mut items = Vec::new();
        let mut more = None;
        for (k, e) in &self.objects {
            if k.group != t.group || k.plural != t.plural {
                continue;
            }
            if ns.is_some_and(|ns| k.namespace != ns) {
                continue;
            }
            if after
                .as_ref()
                .is_some_and(|(ans, aname)| (&k.namespace, &k.name) <= (ans, aname))
            {
                continue;
            }
            if !labels.matches(&e.object) || !fields.matches(&e.object) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                more = items.last().map(|o: &Value| {
                    (
                        o["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        o["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                });
                break;
            }
            items.push(self.render(t, e));
        }
        (items, more)
    }

    /// Creates an object (POST).
    pub fn create(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        mut body: Value,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body must be an object",
            ));
        }
        if body["metadata"]["name"].as_str().is_none()
            && let Some(prefix) = body["metadata"]["generateName"].as_str()
        {
            self.uids += 1;
            body["metadata"]["name"] = json!(format!("{prefix}{:05x}", self.uids));
        }
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !valid_name(&name) {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                    t.kind
                ),
            ));
        }
        if let (Some(ns), Some(bns)) = (ns, body["metadata"]["namespace"].as_str())
            && ns != bns
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the namespace of the object does not match the namespace on the request",
            ));
        }
        if t.namespaced {
            let ns = ns.ok_or_else(|| ApiError::new(400, "BadRequest", "namespace required"))?;
            let nst = self.find("", "namespaces").expect("built-in").clone();
            if !self.objects.contains_key(&Self::key(&nst, None, ns)) {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("namespaces \"{ns}\" not found"),
                ));
            }
            body["metadata"]["namespace"] = json!(ns);
        }
        let key = Self::key(t, ns, &name);
        if self.objects.contains_key(&key) {
            let what = if t.group.is_empty() {
                t.plural.clone()
            } else {
                format!("{}.{}", t.plural, t.group)
            };
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{what} \"{name}\" already exists"),
            ));
        }
        if t.status && t.plural != "customresourcedefinitions" && t.plural != "namespaces" {
            body.as_object_mut().expect("object").remove("status");
        }
        self.check_schema(t, &mut body)?;
        default_fields(t, &mut body);
        if t.plural == "customresourcedefinitions" {
            let served =
                resources::from_crd(&body).map_err(|e| ApiError::new(422, "Invalid", e))?;
            body["status"] = json!({"conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}],
                "acceptedNames": body["spec"]["names"].clone(), "storedVersions": [served.first().map(|s| s.version.clone())]});
            self.types
                .retain(|x| !(x.group == served[0].group && x.plural == served[0].plural));
            self.types.extend(served);
        }
        self.rv += 1;
        self.uids += 1;
        let meta = body["metadata"].as_object_mut().expect("object");
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)),
        );
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        meta.remove("managedFields");
        meta.remove("deletionTimestamp");
        if t.generation {
            meta.insert("generation".into(), json!(1));
        }
        let mut managers = Managers::new();
        if let Some(m) = manager {
            fields::update(
                &mut managers,
                m,
                &json!({}),
                &body,
                t.schema.as_deref(),
                &now(),
            );
        }
        let entry = Entry {
            object: body,
            managers,
        };
        let out = self.render(t, &entry);
        self.record(t, "ADDED", &out, None);
        self.objects.insert(key, entry);
        Ok(out)
    }

    fn check_schema(&self, t: &ResourceType, body: &mut Value) -> Result<(), ApiError> {
        if let Some(s) = &t.schema {
            schema::check(body, s).map_err(|errors| {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                ApiError::new(
                    422,
                    "Invalid",
                    format!("{} \"{name}\" is invalid: {}", t.kind, errors.join(", ")),
                )
            })?;
        }
        Ok(())
    }

    /// Writes `new` over the stored object `key` (from PUT, PATCH or apply), keeping what the
    /// server owns, with the preconditions and side effects of an update.
    fn update(
        &mut self,
        t: &ResourceType,
        key: &Key,
        mut new: Value,
        part: Part,
        managers: Option<Managers>,
    ) -> Result<Value, ApiError> {
        let entry = self
            .objects
            .get(key)
            .ok_or_else(|| not_found(t, &key.name))?;
        let old = entry.object.clone();
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && rv
                != old["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    t.plural, key.name
                ),
            ));
        }
        if t.status {
            match part {
                Part::Main => match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        new.as_object_mut().map(|o| o.remove("status"));
                    }
                },
                Part::Status => {
                    let status = new.get("status").cloned();
                    new = old.clone();
                    match status {
                        Some(s) => new["status"] = s,
                        None => {
                            new.as_object_mut().map(|o| o.remove("status"));
                        }
                    }
                }
            }
        }
        // What the server owns in metadata stays the server's.
        for k in [
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
            "deletionTimestamp",
            "generation",
        ] {
            match old["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    new["metadata"].as_object_mut().map(|m| m.remove(k));
                }
            }
        }
        new["metadata"]
            .as_object_mut()
            .map(|m| m.remove("managedFields"));
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        self.check_schema(t, &mut new)?;
        default_fields(t, &mut new);
        let managers = managers.unwrap_or_else(|| entry.managers.clone());
        // `new` now carries the old resourceVersion and generation, and stored objects hold
        // no managedFields: equal means nothing changed.
        if new == old {
            // A no-op write changes nothing, not even the resource version.
            self.objects.get_mut(key).expect("exists").managers = managers;
            return Ok(self.render(t, self.objects.get(key).expect("exists")));
        }
        if t.generation && spec_of(&new) != spec_of(&old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(g);
        }
        self.rv += 1;
        new["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let finished = new["metadata"].get("deletionTimestamp").is_some()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        let entry = Entry {
            object: new,
            managers,
        };
        let out = self.render(t, &entry);
        self.objects.insert(key.clone(), entry);
        if finished {
            return Ok(self.finish_deletion(t, key));
        }
        self.record(t, "MODIFIED", &out, Some(&old));
        Ok(out)
    }

    /// Replaces an object (PUT).
    pub fn replace(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
        part: Part,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        let key = Self::key(t, ns, name);
        let old = self.objects.get(&key).ok_or_else(|| not_found(t, name))?;
        if body["metadata"]["resourceVersion"]
            .as_str()
            .is_none_or(|rv| rv.is_empty())
        {
            // Kubernetes requires a resourceVersion on update for most kinds; we accept
            // an unconditional replace, as it does for a few.
            body["metadata"]
                .as_object_mut()
                .map(|m| m.remove("resourceVersion"));
        }
        let managers = manager.map(|m| {
            let mut managers = old.managers.clone();
            fields::update(
                &mut managers,
                m,
                &old.object,
                &body,
                t.schema.as_deref(),
                &now(),
            );
            managers
        });
        self.update(t, &key, body, part, managers)
    }

    /// Patches an object: JSON patch, merge patch (also used for strategic merge patch, an
    /// approximation) or server-side apply (which creates a missing object).
    pub fn patch(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        patch: Patch,
        part: Part,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        let key = Self::key(t, ns, name);
        let Some(entry) = self.objects.get(&key) else {
            return match patch {
                Patch::Apply { mut body, .. } if part == Part::Main => {
                    let manager = apply_manager(manager)?;
                    if body["metadata"]["name"].as_str() != Some(name) {
                        return Err(ApiError::new(
                            400,
                            "BadRequest",
                            "the name of the object does not match the name on the URL",
                        ));
                    }
                    body["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("resourceVersion"));
                    self.create(t, ns, body.clone(), None)?;
                    let entry = self.objects.get_mut(&key).expect("just created");
                    // The manager owns what it applied, not what defaulting added.
                    let mut owned = fields::owned_fields(&entry.object, t.schema.as_deref());
                    owned.retain(|p| fields::get(&body, p).is_some());
                    entry
                        .managers
                        .insert(manager.into(), (format!("Apply {}", now()), owned));
                    Ok(self.render(t, self.objects.get(&key).expect("exists")))
                }
                _ => Err(not_found(t, name)),
            };
        };
        let old = entry.object.clone();
        let mut new = self.render(t, entry);
        new["metadata"]
            .as_object_mut()
            .map(|m| m.remove("managedFields"));
        let mut managers = entry.managers.clone();
        match patch {
            Patch::Json(ops) => {
                let ops: json_patch::Patch = serde_json::from_value(ops).map_err(|e| {
                    ApiError::new(400, "BadRequest", format!("invalid JSON patch: {e}"))
                })?;
                json_patch::patch(&mut new, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch cannot be applied: {e}"),
                    )
                })?;
            }
            Patch::Merge(p) => {
                if !p["metadata"]["resourceVersion"].is_string() {
                    new["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("resourceVersion"));
                }
                json_patch::merge(&mut new, &p);
            }
            Patch::Apply { body, force } => {
                let manager = apply_manager(manager)?;
                if !body["metadata"]["resourceVersion"].is_string() {
                    new["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("resourceVersion"));
                }
                // With a status subresource, an apply to the object leaves status alone and
                // an apply to /status touches only status: ownership is split the same way.
                let is_status = |p: &Path| p.first() == Some(&Seg::Field("status".into()));
                let in_part = |p: &Path| !t.status || (part == Part::Status) == is_status(p);
                let mut applied = body.clone();
                if t.status {
                    let status = applied.as_object_mut().and_then(|o| o.remove("status"));
                    if part == Part::Status {
                        applied = json!({"status": status.unwrap_or(json!({}))});
                    }
                }
                let mut scoped: Managers = managers
                    .iter()
                    .map(|(m, (what, set))| {
                        (
                            m.clone(),
                            (
                                what.clone(),
                                set.iter().filter(|p| in_part(p)).cloned().collect(),
                            ),
                        )
                    })
                    .collect();
                fields::apply(
                    &mut new,
                    &mut scoped,
                    manager,
                    &applied,
                    t.schema.as_deref(),
                    force,
                    &now(),
                )
                .map_err(|conflicts| {
                    ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with {} conflict(s): conflicts with {}",
                            conflicts.len(),
                            conflicts.join(", ")
                        ),
                    )
                })?;
                for (_, (_, set)) in managers.iter_mut() {
                    set.retain(|p| !in_part(p));
                }
                for (m, (what, set)) in scoped {
                    let entry = managers
                        .entry(m)
                        .or_insert_with(|| (what.clone(), Default::default()));
                    entry.1.extend(set);
                    entry.0 = what;
                }
                managers.retain(|_, (_, f)| !f.is_empty());
                return self.update(t, &key, new, part, Some(managers));
            }
        }
        if let Some(m) = manager {
            fields::update(&mut managers, m, &old, &new, t.schema.as_deref(), &now());
        }
        self.update(t, &key, new, part, Some(managers))
    }

    /// Deletes an object: at once, or marks it when finalizers remain. Dependents whose
    /// owners are all gone are deleted right away (background propagation; the real garbage
    /// collector does it asynchronously); `Orphan` strips the owner reference instead.
    pub fn delete(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        orphan: bool,
    ) -> Result<Value, ApiError> {
        let key = Self::key(t, ns, name);
        let entry = self.objects.get(&key).ok_or_else(|| not_found(t, name))?;
        let uid = entry.object["metadata"]["uid"].clone();
        if orphan {
            let keys: Vec<Key> = self.objects.keys().cloned().collect();
            for k in keys {
                let e = self.objects.get(&k).expect("listed");
                let refs = e.object["metadata"]["ownerReferences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if refs.iter().any(|r| r["uid"] == uid) {
                    let mut o = e.object.clone();
                    o["metadata"]["ownerReferences"] = json!(
                        refs.into_iter()
                            .filter(|r| r["uid"] != uid)
                            .collect::<Vec<_>>()
                    );
                    let dt = self
                        .find(&k.group, &k.plural)
                        .expect("stored types are served")
                        .clone();
                    self.update(&dt, &k, o, Part::Main, None)?;
                }
            }
        }
        let entry = self.objects.get(&key).expect("still there");
        let has_finalizers = entry.object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if entry.object["metadata"].get("deletionTimestamp").is_some() {
                return Ok(self.render(t, entry));
            }
            let mut o = entry.object.clone();
            self.rv += 1;
            o["metadata"]["deletionTimestamp"] = json!(now());
            o["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            let e = self.objects.get_mut(&key).expect("exists");
            let before = std::mem::replace(&mut e.object, o);
            let out = self.render(t, self.objects.get(&key).expect("exists"));
            self.record(t, "MODIFIED", &out, Some(&before));
            return Ok(out);
        }
        Ok(self.finish_deletion(t, &key))
    }

    /// Removes one object for good: a new resource version, a DELETED event carrying it.
    fn remove(&mut self, t: &ResourceType, key: &Key) -> Option<(Value, Value)> {
        let entry = self.objects.remove(key)?;
        self.rv += 1;
        let mut out = self.render(t, &entry);
        out["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(t, "DELETED", &out, None);
        Some((entry.object, out))
    }

    /// Removes an object whose deletion is complete (no finalizers left), with what goes
    /// with it: a CRD's kind and objects, a namespace's objects, orphaned dependents.
    fn finish_deletion(&mut self, t: &ResourceType, key: &Key) -> Value {
        let (stored, out) = self.remove(t, key).expect("the object exists");
        let mut gone: Vec<Key> = Vec::new();
        let mut gone_type = None;
        if t.plural == "customresourcedefinitions"
            && let Ok(served) = resources::from_crd(&stored)
        {
            let (g, p) = (served[0].group.clone(), served[0].plural.clone());
            gone.extend(
                self.objects
                    .keys()
                    .filter(|k| k.group == g && k.plural == p)
                    .cloned(),
            );
            gone_type = Some((g, p));
        }
        if t.plural == "namespaces" {
            gone.extend(
                self.objects
                    .keys()
                    .filter(|k| k.namespace == key.name)
                    .cloned(),
            );
        }
        for k in gone {
            let dt = self
                .find(&k.group, &k.plural)
                .expect("stored types are served")
                .clone();
            self.remove(&dt, &k);
        }
        if let Some((g, p)) = gone_type {
            self.types.retain(|x| !(x.group == g && x.plural == p));
        }
        self.collect_garbage();
        out
    }
    /// Deletes every object whose owner references all point to objects that are gone.
    fn collect_garbage(&mut self) {
        loop {
            let uids: std::collections::HashSet<String> = self
                .objects
                .values()
                .filter_map(|e| e.object["metadata"]["uid"].as_str().map(String::from))
                .collect();
            let orphaned: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, e)| {
                    e.object["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| {
                            !refs.is_empty()
                                && refs
                                    .iter()
                                    .all(|r| r["uid"].as_str().is_none_or(|u| !uids.contains(u)))
                        })
                        && e.object["metadata"].get("deletionTimestamp").is_none()
                })
                .map(|(k, _)| k.clone())
                .collect();
            if orphaned.is_empty() {
                return;
            }
            for k in orphaned {
                let t = self
                    .find(&k.group, &k.plural)
                    .expect("stored types are served")
                    .clone();
                let ns = (!k.namespace.is_empty()).then_some(k.namespace.clone());
                let _ = self.delete(&t, ns.as_deref(), &k.name, false);
            }
        }
    }

    /// Starts a watch. Without a resource version (or with "0") it begins with an ADDED
    /// event per matching object; with one, it replays the changes after it, or fails with
    /// 410 Gone when they are no longer kept.
    pub fn watch(
        &mut self,
        t: &ResourceType,
        watch: Watch,
        since: Option<u64>,
    ) -> Result<(Vec<Value>, mpsc::UnboundedReceiver<Value>), ApiError> {
        let mut replay = Vec::new();
        match since {
            None | Some(0) => {
                let (items, _) = self.list(
                    t,
                    watch.namespace.as_deref(),
                    &watch.labels,
                    &watch.fields,
                    None,
                    None,
                );
                replay.extend(
                    items
                        .into_iter()
                        .map(|o| json!({"type": "ADDED", "object": o})),
                );
            }
            Some(rv) => {
                let oldest = self.history.front().map_or(self.rv, |c| c.rv);
                if rv + 1 < oldest && rv < self.rv {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", oldest - 1),
                    ));
                }
                replay.extend(
                    self.history
                        .iter()
                        .filter(|c| c.rv > rv)
                        .filter_map(|c| watch.event(c)),
                );
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push((watch, tx));
        Ok((replay, rx))
    }

    /// Ends every watch (their streams close).
    pub fn drop_watches(&mut self) {
        self.watchers.clear();
    }
}

/// The field manager an apply must name.
fn apply_manager(manager: Option<&str>) -> Result<&str, ApiError> {
    manager.ok_or_else(|| {
        ApiError::new(
            400,
            "BadRequest",
            "fieldManager is required for apply patch",
        )
    })
}

/// A patch, by content type.
pub enum Patch {
    /// `application/json-patch+json`.
    Json(Value),
    /// `application/merge-patch+json` (and `strategic-merge-patch+json`, approximated).
    Merge(Value),
    /// `application/apply-patch+yaml`.
    Apply {
        /// The applied object.
        body: Value,
        /// `?force=true`.
        force: bool,
    },
}
