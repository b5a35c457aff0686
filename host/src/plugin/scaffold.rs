//! `celery-operator plugin new`: a plugin project that builds, with a test, in Rust (the SDK
//! in `plugins/sdk`) or Python (the SDK in `plugins/python`, built with componentize-py).
//! The input file of each world is the one `plugin run` takes (`examples/plugins/inputs/`).

use std::path::{Path, PathBuf};

use super::Role;

/// The languages a plugin can be scaffolded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with `celery-operator-plugin-sdk` (a ~100-200 KB component).
    Rust,
    /// Python, with the `celery-operator-plugin` package and componentize-py (a ~18 MB
    /// component: ship it from a registry).
    Python,
}

/// Where the Rust SDK comes from when no path is given.
const SDK_GIT: &str = "https://github.com/celery-operator/celery-operator";

/// Writes a new plugin project for `role` into `dir` (which must not exist or be empty);
/// the files written. `sdk_path` is a local Rust SDK (`plugins/sdk`) to depend on instead
/// of the project's git repository.
pub fn scaffold(
    dir: &Path,
    name: &str,
    role: Role,
    lang: Lang,
    sdk_path: Option<&Path>,
) -> Result<Vec<PathBuf>, String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!(
            "{name:?} is not a plugin name: lowercase letters, digits and '-', starting with a letter"
        ));
    }
    if dir
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(format!(
            "{} exists and is not empty; nothing was written",
            dir.display()
        ));
    }
    let world = role.interface();
    let input = match role {
        Role::Shaper => include_str!("../../../examples/plugins/inputs/shaper.json"),
        Role::Autoscaler => include_str!("../../../examples/plugins/inputs/autoscaler.json"),
        Role::Scaler => SCALER_INPUT,
    };
    let files: Vec<(&str, String)> = match lang {
        Lang::Rust => {
            let sdk = match sdk_path {
                Some(path) => format!("{{ path = {:?} }}", path.display().to_string()),
                None => format!("{{ git = {SDK_GIT:?} }}"),
            };
            vec![
                (
                    "Cargo.toml",
                    RUST_CARGO
                        .replace("{{name}}", name)
                        .replace("{{sdk}}", &sdk),
                ),
                ("src/lib.rs", rust_lib(role).replace("{{name}}", name)),
                ("input.json", input.to_string()),
                ("README.md", readme(role, lang, name)),
            ]
        }
        Lang::Python => vec![
            ("app.py", python_app(role).replace("{{name}}", name)),
            (
                "test_app.py",
                PYTHON_TEST
                    .replace("{{name}}", name)
                    .replace("{{world}}", world)
                    .replace("{{check}}", python_check(role)),
            ),
            ("input.json", input.to_string()),
            ("README.md", readme(role, lang, name)),
        ],
    };
    let mut written = Vec::new();
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A scaler input with 37 tasks at 5 per replica: the scaffolded scaler answers 8.
const SCALER_INPUT: &str = r##"{
  "pool": "reports",
  "nowMs": 1795428000000,
  "currentReplicas": 2,
  "minReplicas": 0,
  "maxReplicas": 20,
  "targetPerReplica": 5,
  "samples": [
    {"atMs": 1795428000000, "queues": [{"name": "reports", "ready": 30, "reserved": 7}]}
  ],
  "history": [],
  "settings": {}
}
"##;

const RUST_CARGO: &str = r##"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
celery-operator-plugin-sdk = {{sdk}}

# A small component travels in a ConfigMap (about 1 MiB at most).
[profile.release]
opt-level = "s"
lto = true
panic = "abort"
strip = true

# A project of its own, not a member of an enclosing workspace.
[workspace]
"##;

fn rust_lib(role: Role) -> &'static str {
    match role {
        Role::Scaler => {
            r##"//! `{{name}}`: a celery-operator scaler plugin. It asks for enough replicas that each
//! has at most `target-per-replica` tasks (waiting or reserved) in the latest sample.

use celery_operator_plugin_sdk::scaler::{Decision, Guest, ScalingInput};

/// The plugin.
pub struct Plugin;

impl Guest for Plugin {
    fn decide(input: ScalingInput) -> Result<Decision, String> {
        let latest = input.samples.last().ok_or("no samples")?;
        let backlog: u64 = latest.queues.iter().map(|q| q.ready + q.reserved).sum();
        if input.target_per_replica <= 0.0 {
            return Err("target-per-replica must be positive".into());
        }
        let wanted = (backlog as f64 / input.target_per_replica).ceil() as u32;
        let replicas = wanted.clamp(input.min_replicas, input.max_replicas.max(input.min_replicas));
        Ok(Decision {
            replicas,
            recommendation: wanted,
            reason: format!("{backlog} tasks at {} per replica", input.target_per_replica),
        })
    }
}

celery_operator_plugin_sdk::export_scaler!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use celery_operator_plugin_sdk::scaler::{QueueDepth, Sample};

    #[test]
    fn asks_for_a_replica_per_target_tasks() {
        let input = ScalingInput {
            pool: "reports".into(),
            now_ms: 0,
            current_replicas: 2,
            min_replicas: 0,
            max_replicas: 20,
            target_per_replica: 5.0,
            samples: vec![Sample {
                at_ms: 0,
                queues: vec![QueueDepth {
                    name: "reports".into(),
                    ready: 30,
                    reserved: 7,
                    oldest_wait_ms: None,
                }],
            }],
            history: vec![],
            settings: "{}".into(),
            // What the operator measured of the workers (all unknown here).
            workload: Default::default(),
        };
        assert_eq!(Plugin::decide(input).unwrap().replicas, 8);
    }
}
"##
        }
        Role::Shaper => {
            r##"//! `{{name}}`: a celery-operator shaper plugin. It receives the objects built for a
//! Celery resource and returns them, changed or not; an error vetoes them.

use celery_operator_plugin_sdk::shaper::{Guest, ShapeInput};

/// The plugin.
pub struct Plugin;

impl Guest for Plugin {
    fn shape(input: ShapeInput) -> Result<Vec<String>, String> {
        // Each object is JSON text; parse it with celery_operator_plugin_sdk::serde_json to
        // change it.
        Ok(input.objects)
    }
}

celery_operator_plugin_sdk::export_shaper!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_objects() {
        let objects = vec![r#"{"kind":"Deployment"}"#.to_string()];
        let input = ShapeInput { celery: "{}".into(), objects: objects.clone(), settings: "{}".into() };
        assert_eq!(Plugin::shape(input).unwrap(), objects);
    }
}
"##
        }
        Role::Autoscaler => {
            r##"//! `{{name}}`: a celery-operator autoscaler plugin. It returns the objects (JSON text)
//! that scale one pool's Deployment: an HorizontalPodAutoscaler, a KEDA ScaledObject, ...

use celery_operator_plugin_sdk::autoscaler::{Guest, PoolInput};
use celery_operator_plugin_sdk::serde_json::json;

/// The plugin.
pub struct Plugin;

impl Guest for Plugin {
    fn objects(input: PoolInput) -> Result<Vec<String>, String> {
        let hpa = json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": input.deployment},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": input.deployment},
                "minReplicas": 1,
                "maxReplicas": 10,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70}}}]
            }
        });
        Ok(vec![hpa.to_string()])
    }
}

celery_operator_plugin_sdk::export_autoscaler!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_the_pools_deployment() {
        let input = PoolInput {
            celery: "{}".into(),
            pool: "web".into(),
            deployment: "shop-worker-web".into(),
            autoscaling: "{}".into(),
            queues: vec!["web".into()],
            settings: "{}".into(),
        };
        let objects = Plugin::objects(input).unwrap();
        assert!(objects[0].contains("shop-worker-web"));
    }
}
"##
        }
    }
}

fn python_app(role: Role) -> &'static str {
    match role {
        Role::Scaler => {
            r##""""`{{name}}`: a celery-operator scaler plugin. It asks for enough replicas that each
has at most `target_per_replica` tasks (waiting or reserved) in the latest sample."""

from celery_operator_plugin import backlog, clamp, reject, replicas_for
from wit_world import exports
from wit_world.exports.scaler import Decision, ScalingInput


class Scaler(exports.Scaler):
    def decide(self, input: ScalingInput) -> Decision:
        if input.target_per_replica <= 0:
            reject("target-per-replica must be positive")
        tasks = backlog(input.samples[-1].queues)
        wanted = replicas_for(tasks, input.target_per_replica)
        replicas = clamp(wanted, input.min_replicas, input.max_replicas)
        reason = f"{tasks} tasks at {input.target_per_replica:g} per replica"
        return Decision(replicas=replicas, recommendation=wanted, reason=reason)
"##
        }
        Role::Shaper => {
            r##""""`{{name}}`: a celery-operator shaper plugin. It receives the objects built for a
Celery resource (JSON text) and returns them, changed or not; `reject` vetoes them."""

from typing import List

from wit_world import exports
from wit_world.exports.shaper import ShapeInput


class Shaper(exports.Shaper):
    def shape(self, input: ShapeInput) -> List[str]:
        # json.loads each object to change it, json.dumps it back.
        return input.objects
"##
        }
        Role::Autoscaler => {
            r##""""`{{name}}`: a celery-operator autoscaler plugin. It returns the objects (JSON text)
that scale one pool's Deployment: an HorizontalPodAutoscaler, a KEDA ScaledObject, ..."""

import json
from typing import List

from wit_world import exports
from wit_world.exports.autoscaler import PoolInput


class Autoscaler(exports.Autoscaler):
    def objects(self, input: PoolInput) -> List[str]:
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": input.deployment}
        cpu = {"type": "Resource", "resource": {"name": "cpu",
               "target": {"type": "Utilization", "averageUtilization": 70}}}
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": input.deployment},
            "spec": {"scaleTargetRef": target, "minReplicas": 1, "maxReplicas": 10,
                     "metrics": [cpu]},
        }
        return [json.dumps(hpa)]
"##
        }
    }
}

fn python_check(role: Role) -> &'static str {
    match role {
        Role::Scaler => r#"self.assertEqual(answer["replicas"], 8, answer)"#,
        Role::Shaper | Role::Autoscaler => r#"self.assertTrue(answer, answer)"#,
    }
}

const PYTHON_TEST: &str = r##""""Builds the plugin and calls it on input.json with the operator's CLI, as the operator
would call it. Needs the SDK (`pip install celery-operator-plugin`, or plugins/python of a
checkout) and `celery-operator` on PATH (or in $CELERY_OPERATOR)."""

import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = os.environ.get("CELERY_OPERATOR", "celery-operator")


class PluginTest(unittest.TestCase):
    def test_answers_the_sample_input(self):
        wasm = HERE / "{{name}}.wasm"
        build = [sys.executable, "-m", "celery_operator_plugin", "build", "app",
                 "--world", "{{world}}", "-o", str(wasm)]
        subprocess.run(build, cwd=HERE, check=True)
        # A Python component is ~18 MB: compiling it takes seconds and ~400 MiB.
        run = [CLI, "plugin", "run", str(wasm), "--world", "{{world}}-plugin",
               "--input", str(HERE / "input.json"),
               "--plugin-compile-timeout-seconds", "120", "--plugin-compile-memory-mib", "1024"]
        out = subprocess.run(run, check=True, capture_output=True, text=True)
        answer = json.loads(out.stdout)
        {{check}}


if __name__ == "__main__":
    unittest.main()
"##;

fn readme(role: Role, lang: Lang, name: &str) -> String {
    let world = role.world();
    let (build, wasm, test) = match lang {
        Lang::Rust => (
            "cargo build --release --target wasm32-wasip2".to_string(),
            format!(
                "target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            ),
            "cargo test",
        ),
        Lang::Python => (
            format!(
                "celery-operator-plugin build app --world {} -o {name}.wasm",
                role.interface()
            ),
            format!("{name}.wasm"),
            "python -m unittest",
        ),
    };
    format!(
        "# {name}\n\nA celery-operator plugin (world `{world}`), scaffolded by `celery-operator plugin new`.\n\n\
         ```sh\n\
         {test}                       # the test\n\
         {build}\n\
         celery-operator plugin check {wasm}\n\
         celery-operator plugin run {wasm} --world {world} --input input.json\n\
         # ship it from a registry, signed (see the celery-operator README, \"Plugins from a registry\"):\n\
         celery-operator plugin push {wasm} oci://registry.example.com/plugins/{name}:0.1.0 --name {name} --namespace celery-operator > configmap.yaml\n\
         celery-operator plugin sign \"$(grep 'oci:' configmap.yaml | cut -d' ' -f4)\" --key cosign.pem\n\
         kubectl apply -f configmap.yaml\n\
         ```\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("scaffold-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn writes_a_project_per_language_and_world_and_never_overwrites() {
        for lang in [Lang::Rust, Lang::Python] {
            for role in Role::ALL {
                let at = dir(&format!("{lang:?}-{role}"));
                let files = scaffold(&at, "my-plugin", role, lang, None).unwrap();
                assert_eq!(files.len(), 4);
                for file in &files {
                    let text = std::fs::read_to_string(file).unwrap();
                    assert!(!text.contains("{{"), "{}: {text}", file.display());
                }
                let error = scaffold(&at, "my-plugin", role, lang, None).unwrap_err();
                assert!(error.contains("not empty"), "{error}");
                std::fs::remove_dir_all(&at).unwrap();
            }
        }
        let at = dir("bad");
        assert!(scaffold(&at, "My_Plugin", Role::Scaler, Lang::Rust, None).is_err());
        assert!(!at.exists(), "nothing written for a bad name");
    }

    #[test]
    fn the_rust_sdk_comes_from_git_or_a_path() {
        let at = dir("sdk");
        scaffold(
            &at,
            "p",
            Role::Scaler,
            Lang::Rust,
            Some(Path::new("/src/plugins/sdk")),
        )
        .unwrap();
        let cargo = std::fs::read_to_string(at.join("Cargo.toml")).unwrap();
        assert!(
            cargo.contains(r#"{ path = "/src/plugins/sdk" }"#),
            "{cargo}"
        );
        std::fs::remove_dir_all(&at).unwrap();
    }
}
