//! HTTP: connections, routing of Kubernetes API paths, fault injection, watch streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::resources::{self, ResourceType};
use crate::selectors::{Fields, Labels};
use crate::store::{ApiError, Part, Patch, Watch};
use crate::{Request, Shared};

type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections until `stop`; each connection is cut when `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Closed with a reset, not a FIN: a connection cut by `stop` leaves no
                    // FIN_WAIT2/TIME_WAIT socket behind on this port. On loopback a client's
                    // next connections reuse the same source ports, and a SYN meeting such a
                    // socket is refused for up to a minute after `restart`.
                    let _ = stream.set_zero_linger();
                    stream
                }
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn error(e: &ApiError) -> Response<Body> {
    full(StatusCode::from_u16(e.code).expect("valid code"), &e.body())
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

async fn handle(shared: Arc<Shared>, req: hyper::Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or_default().to_string();
    let params = query_pairs(&query);
    let param = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.clone())
    };
    let is_watch = matches!(param("watch").as_deref(), Some("true" | "1"));
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let user = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(String::from);
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();

    let faults = shared.faults.lock().expect("faults lock").clone();
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let response = if faults.error_share > 0.0 && shared.random() < faults.error_share {
        error(&ApiError::new(
            500,
            "InternalError",
            "injected fault: internal error",
        ))
    } else if faults.throttle_share > 0.0 && shared.random() < faults.throttle_share {
        let mut r = error(&ApiError::new(
            429,
            "TooManyRequests",
            "injected fault: too many requests",
        ));
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r
    } else if parts.method != Method::GET
        && faults
            .forbidden_writes
            .iter()
            .any(|p| path.contains(p.as_str()))
    {
        error(&ApiError::new(
            403,
            "Forbidden",
            format!("injected fault: {} {path} is forbidden", parts.method),
        ))
    } else if parts.method != Method::GET
        && faults.conflict_share > 0.0
        && shared.random() < faults.conflict_share
    {
        error(&ApiError::new(
            409,
            "Conflict",
            "injected fault: the object has been modified; please apply your changes to the latest version and try again",
        ))
    } else {
        route(
            &shared,
            &parts.method,
            &path,
            &param,
            is_watch,
            &content_type,
            &bytes,
        )
    };
    shared
        .requests
        .lock()
        .expect("requests lock")
        .push(Request {
            method: parts.method.to_string(),
            path,
            query,
            status: response.status().as_u16(),
            watch: is_watch,
            user,
        });
    response
}

/// A request's target after the group/version: the resource type, namespace, name and
/// subresource.
struct Target {
    t: ResourceType,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(shared: &Shared, segs: &[&str]) -> Result<Option<Target>, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let store = shared.store.lock().expect("store lock");
    let served = |plural: &str| store.served(group, version, plural);
    let namespaced =
        rest[0] == "namespaces" && rest.len() >= 3 && served(rest[2]).is_some_and(|t| t.namespaced);
    let (ns, rest) = if namespaced {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    // Cheap: the schema is shared, not copied.
    let t = served(rest[0]).cloned().ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({group}/{version}/{})",
                rest[0]
            ),
        )
    })?;
    Ok(Some(Target {
        t,
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    }))
}

fn parse_body(bytes: &[u8], yaml: bool) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .or_else(|e| {
            if yaml {
                serde_saphyr::from_str(&String::from_utf8_lossy(bytes)).map_err(|e| e.to_string())
            } else {
                Err(e.to_string())
            }
        })
        .map_err(|e| {
            ApiError::new(
                400,
                "BadRequest",
                format!("the body cannot be decoded: {e}"),
            )
        })
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    param: &dyn Fn(&str) -> Option<String>,
    is_watch: bool,
    content_type: &str,
    bytes: &[u8],
) -> Response<Body> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if *method == Method::GET {
        let store = shared.store.lock().expect("store lock");
        if let Some(doc) = resources::discovery(&store.types, &segs) {
            return full(StatusCode::OK, &doc);
        }
        if segs == ["version"] {
            return full(
                StatusCode::OK,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-memory-apiserver", "platform": "linux/amd64"}),
            );
        }
    }
    let target = match parse_target(shared, &segs) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return error(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
        Err(e) => return error(&e),
    };
    if target.t.namespaced
        && target.ns.is_none()
        && !(*method == Method::GET && target.name.is_none())
    {
        return error(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    if is_watch {
        return watch_stream(shared, &target, param);
    }
    let manager = param("fieldManager");
    let ns = target.ns.as_deref();
    let part = match target.sub.as_deref() {
        None => Part::Main,
        Some("status") if target.t.status => Part::Status,
        Some("scale") if target.t.scale => {
            return scale(shared, method, &target, content_type, bytes);
        }
        Some(_) => {
            return error(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let mut store = shared.store.lock().expect("store lock");
    let mut created = false;
    let result = match (method.as_str(), target.name.as_deref()) {
        ("GET", None) => {
            let labels = match Labels::parse(&param("labelSelector").unwrap_or_default()) {
                Ok(l) => l,
                Err(e) => return error(&ApiError::new(400, "BadRequest", e)),
            };
            let fields = match Fields::parse(&param("fieldSelector").unwrap_or_default()) {
                Ok(f) => f,
                Err(e) => return error(&ApiError::new(400, "BadRequest", e)),
            };
            let limit = param("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0);
            let after = param("continue").filter(|c| !c.is_empty()).and_then(|c| {
                let (ns, name) = c.split_once('/')?;
                Some((ns.to_string(), name.to_string()))
            });
            let (items, more) = store.list(&target.t, ns, &labels, &fields, limit, after);
            let mut meta = json!({"resourceVersion": store.resource_version().to_string()});
            if let Some((ns, name)) = more {
                meta["continue"] = json!(format!("{ns}/{name}"));
            }
            Ok(
                json!({"kind": format!("{}List", target.t.kind), "apiVersion": target.t.api_version(),
                      "metadata": meta, "items": items}),
            )
        }
        ("GET", Some(name)) => store.get(&target.t, ns, name),
        ("POST", None) => parse_body(bytes, false)
            .and_then(|b| store.create(&target.t, ns, b, manager.as_deref())),
        ("PUT", Some(name)) => parse_body(bytes, false)
            .and_then(|b| store.replace(&target.t, ns, name, b, part, manager.as_deref())),
        ("PATCH", Some(name)) => {
            // An apply that creates its object answers 201, as Kubernetes does.
            created = content_type.starts_with("application/apply-patch+yaml")
                && part == Part::Main
                && store.get(&target.t, ns, name).is_err();
            let patch = if content_type.starts_with("application/json-patch+json") {
                parse_body(bytes, false).map(Patch::Json)
            } else if content_type.starts_with("application/apply-patch+yaml") {
                parse_body(bytes, true).map(|body| Patch::Apply {
                    body,
                    force: param("force").as_deref() == Some("true"),
                })
            } else if content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json")
            {
                parse_body(bytes, false).map(Patch::Merge)
            } else {
                Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type})"
                    ),
                ))
            };
            patch.and_then(|p| store.patch(&target.t, ns, name, p, part, manager.as_deref()))
        }
        ("DELETE", Some(name)) => {
            let options: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
            let policy = options["propagationPolicy"]
                .as_str()
                .map(String::from)
                .or_else(|| param("propagationPolicy"));
            store.delete(&target.t, ns, name, policy.as_deref() == Some("Orphan"))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    };
    match result {
        Ok(o) if *method == Method::POST || created => full(StatusCode::CREATED, &o),
        Ok(o) => full(StatusCode::OK, &o),
        Err(e) => error(&e),
    }
}

/// The `scale` subresource of a Deployment (`autoscaling/v1` Scale).
fn scale(
    shared: &Shared,
    method: &Method,
    target: &Target,
    content_type: &str,
    bytes: &[u8],
) -> Response<Body> {
    let mut store = shared.store.lock().expect("store lock");
    let (ns, name) = (
        target.ns.as_deref(),
        target.name.as_deref().unwrap_or_default(),
    );
    let as_scale = |d: &Value| {
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
               "metadata": {"name": d["metadata"]["name"], "namespace": d["metadata"]["namespace"],
                            "uid": d["metadata"]["uid"], "resourceVersion": d["metadata"]["resourceVersion"],
                            "creationTimestamp": d["metadata"]["creationTimestamp"]},
               "spec": {"replicas": d["spec"]["replicas"].as_i64().unwrap_or(1)},
               "status": {"replicas": d["status"]["replicas"].as_i64().unwrap_or(0),
                          "selector": selector_string(&d["spec"]["selector"])}})
    };
    let deployment = match store.get(&target.t, ns, name) {
        Ok(d) => d,
        Err(e) => return error(&e),
    };
    let mut wanted = as_scale(&deployment);
    match method.as_str() {
        "GET" => return full(StatusCode::OK, &wanted),
        "PUT" => match parse_body(bytes, false) {
            Ok(b) => wanted = b,
            Err(e) => return error(&e),
        },
        "PATCH" => {
            let applied = parse_body(bytes, true).and_then(|p| {
                if content_type.starts_with("application/json-patch+json") {
                    let ops: json_patch::Patch = serde_json::from_value(p)
                        .map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?;
                    json_patch::patch(&mut wanted, &ops)
                        .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))
                } else {
                    json_patch::merge(&mut wanted, &p);
                    Ok(())
                }
            });
            if let Err(e) = applied {
                return error(&e);
            }
        }
        _ => {
            return error(&ApiError::new(
                405,
                "MethodNotAllowed",
                "scale supports get, update and patch",
            ));
        }
    }
    let Some(replicas) = wanted["spec"]["replicas"].as_i64().filter(|r| *r >= 0) else {
        return error(&ApiError::new(
            422,
            "Invalid",
            "spec.replicas: Invalid value: must be greater than or equal to 0",
        ));
    };
    let mut d = deployment;
    d["spec"]["replicas"] = json!(replicas);
    let precondition = wanted["metadata"]["resourceVersion"]
        .as_str()
        .map(String::from);
    match precondition {
        Some(rv) if Some(rv.as_str()) != d["metadata"]["resourceVersion"].as_str() => {
            return error(&ApiError::new(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        _ => {}
    }
    d["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    match store.replace(&target.t, ns, name, d, Part::Main, None) {
        Ok(d) => full(StatusCode::OK, &as_scale(&d)),
        Err(e) => error(&e),
    }
}

fn selector_string(selector: &Value) -> String {
    selector["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A watch: replayed or initial events, then live ones, bookmarks when allowed, until
/// `timeoutSeconds`, a dropped watch, or the client going away.
fn watch_stream(
    shared: &Arc<Shared>,
    target: &Target,
    param: &dyn Fn(&str) -> Option<String>,
) -> Response<Body> {
    let labels = Labels::parse(&param("labelSelector").unwrap_or_default()).unwrap_or_default();
    let fields = Fields::parse(&param("fieldSelector").unwrap_or_default()).unwrap_or_default();
    let since = param("resourceVersion")
        .filter(|v| !v.is_empty())
        .and_then(|v| v.parse::<u64>().ok());
    let bookmarks = param("allowWatchBookmarks").as_deref() == Some("true");
    let timeout = param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let watch = Watch {
        group: target.t.group.clone(),
        plural: target.t.plural.clone(),
        namespace: target.ns.clone(),
        labels,
        fields,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let line = |v: &Value| Bytes::from(format!("{v}\n"));
    let started = shared
        .store
        .lock()
        .expect("store lock")
        .watch(&target.t, watch, since);
    let (replay, mut live) = match started {
        Ok(s) => s,
        Err(e) => {
            // As the API server does: a 200 with one ERROR event carrying the Status.
            let body = line(&json!({"type": "ERROR", "object": e.body()}));
            return Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body).boxed())
                .expect("valid response");
        }
    };
    let (shared, kind, api_version) = (
        shared.clone(),
        target.t.kind.clone(),
        target.t.api_version(),
    );
    tokio::spawn(async move {
        for event in replay {
            if tx.send(line(&event)).await.is_err() {
                return;
            }
        }
        let every = *shared.bookmark_interval.lock().expect("lock");
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Some(e) => if tx.send(line(&e)).await.is_err() { return },
                    None => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    // Everything this watch was sent is forwarded before the version is read,
                    // so a bookmark never skips an event.
                    let (pending, rv) = {
                        let store = shared.store.lock().expect("store lock");
                        let mut pending = Vec::new();
                        while let Ok(e) = live.try_recv() {
                            pending.push(e);
                        }
                        (pending, store.resource_version())
                    };
                    for e in pending {
                        if tx.send(line(&e)).await.is_err() { return }
                    }
                    let mark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                                      "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(&mark)).await.is_err() { return }
                }
                _ = &mut deadline => return,
            }
        }
    });
    let stream = tokio_stream(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

fn tokio_stream(mut rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
