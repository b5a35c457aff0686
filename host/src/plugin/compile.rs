//! Compiling untrusted components without trusting them: in a child process with a wall-clock
//! deadline and a memory cap.
//!
//! Compilation cannot be interrupted from inside: a valid component of less than a megabyte
//! (two hundred thousand empty functions; for Cranelift, also one function with tens of
//! thousands of locals and blocks) keeps the compiler busy for seconds and takes gigabytes. So the bytes of a plugin from a ConfigMap or a file are
//! compiled by a child process (`celery-operator plugin compile-sandboxed`, the same binary
//! and engine configuration) whose data segment is capped with `RLIMIT_DATA` and which is
//! killed at the deadline. It hands back wasmtime's serialized form of the component, which
//! the parent loads (with wasmtime's own version and configuration checks).
//!
//! The operator compiles the built-in plugins the same way (it keeps the compiler out of its
//! own memory); `render` and the tests compile them in process.
//!
//! With a cache directory, the serialized form is also kept on disk, keyed by the
//! component's digest and the engine's configuration, so a restarted operator loads its
//! plugins without compiling. A cache file carries the sha256 of what follows it: a corrupt
//! file is deleted and the component compiled again; a file from another wasmtime or
//! configuration has another name, and wasmtime refuses it anyway.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::Component;

use super::PluginError;

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: [&str; 2] = ["plugin", "compile-sandboxed"];
/// Largest serialized component accepted from the child.
const MAX_ARTIFACT_BYTES: usize = 512 << 20;

/// Where components are compiled.
#[derive(Clone, Debug)]
pub enum Compiler {
    /// In this process, without bounds: only for bytes the operator ships itself (the
    /// built-in plugins) and for tests.
    InProcess,
    /// In a child process, bounded.
    Sandboxed(Sandbox),
}

/// The bounds of a sandboxed compilation.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// The `celery-operator` binary that runs the compilation.
    pub program: PathBuf,
    /// Wall-clock time a compilation may take.
    pub timeout: Duration,
    /// Memory (data segment: heap and anonymous mappings) the compilation may use.
    pub memory_bytes: u64,
    /// Where compiled components are kept across restarts (`None`: not kept).
    pub cache: Option<DiskCache>,
}

/// Compiled components kept on disk, within a size budget: the least recently used files
/// are removed when a new one would pass it (a Python plugin compiles to ~35 MB, and the
/// chart's volume evicts the pod past its size limit).
#[derive(Clone, Debug)]
pub struct DiskCache {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes the files may take together.
    pub max_bytes: u64,
}

impl Sandbox {
    /// Default bounds: 10 s, 512 MiB. The default plugins compile in 30-65 ms (with the
    /// child's start) and about 30 MiB; the Python example in 1.6 s and up to 512 MiB.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// See [`Sandbox::DEFAULT_TIMEOUT`].
    pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;

    /// This very binary as the compiler (the operator and the CLI).
    pub fn this_binary(timeout: Duration, memory_bytes: u64) -> Sandbox {
        Sandbox {
            program: std::env::current_exe().unwrap_or_else(|_| "celery-operator".into()),
            timeout,
            memory_bytes,
            cache: None,
        }
    }
}

impl Compiler {
    /// Compiles `bytes` for `engine`.
    pub fn compile(&self, engine: &Engine, bytes: &[u8]) -> Result<Component, PluginError> {
        match self {
            Compiler::InProcess => Component::new(engine, bytes).map_err(invalid),
            Compiler::Sandboxed(sandbox) => {
                let cached = sandbox.cache.as_ref().map(|c| (c, c.file(engine, bytes)));
                if let Some(component) = cached.as_ref().and_then(|(_, f)| load_cached(engine, f)) {
                    return Ok(component);
                }
                let artifact = sandbox.run(bytes)?;
                // SAFETY: the artifact comes from our own child process, which compiled it
                // with this binary's engine configuration; wasmtime checks the version and
                // configuration it was made with before using it.
                let component =
                    unsafe { Component::deserialize(engine, &artifact) }.map_err(|e| {
                        PluginError::Invalid(format!("the compiled component does not load: {e:#}"))
                    })?;
                if let Some((cache, file)) = cached {
                    cache.store(&file, &artifact);
                }
                Ok(component)
            }
        }
    }
}

impl DiskCache {
    /// The cache file of `bytes` compiled for `engine`.
    fn file(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let digest = super::Runtime::digest(bytes);
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join(format!("{hex}-{:016x}.{CACHE_EXTENSION}", hasher.finish()))
    }

    /// Writes a cache file atomically (a temporary file renamed), so a crash leaves no half
    /// file, after making room for it within the budget. A cache that cannot be written only
    /// costs a compile on the next start.
    fn store(&self, file: &Path, artifact: &[u8]) {
        use sha2::{Digest, Sha256};
        let size = artifact.len() as u64 + 32;
        if size > self.max_bytes {
            return;
        }
        self.make_room(size);
        let temporary = file.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| {
                let mut out = std::fs::File::create(&temporary)?;
                out.write_all(&Sha256::digest(artifact))?;
                out.write_all(artifact)?;
                out.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, file));
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = %e, "cannot write the compiled-plugin cache");
            let _ = std::fs::remove_file(&temporary);
        }
    }

    /// Removes the least recently used cache files until `size` more bytes fit the budget.
    fn make_room(&self, size: u64) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let meta = e.metadata().ok()?;
                let path = e.path();
                let ours = path.extension().is_some_and(|x| x == CACHE_EXTENSION);
                let modified = meta.modified().ok()?;
                (ours && meta.is_file()).then_some((modified, meta.len(), path))
            })
            .collect();
        files.sort();
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        for (_, len, path) in files {
            if used + size <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                used -= len;
            }
        }
    }
}

/// The extension of cache files (the cache removes nothing else).
const CACHE_EXTENSION: &str = "cwasm";

/// The component in the cache file `file`, if it is there and intact; a damaged file is
/// removed. A file used is marked recently used.
fn load_cached(engine: &Engine, file: &Path) -> Option<Component> {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(file).ok()?;
    let intact = data.len() > 32 && Sha256::digest(&data[32..]).as_slice() == &data[..32];
    // SAFETY: the file was written by `DiskCache::store` in a directory only this operator
    // writes, and its checksum matches; wasmtime checks its version and configuration.
    let component = intact
        .then(|| unsafe { Component::deserialize(engine, &data[32..]) }.ok())
        .flatten();
    match component {
        Some(_) => {
            let _ = std::fs::File::options()
                .append(true)
                .open(file)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
        None => {
            tracing::warn!(file = %file.display(), "ignoring a damaged or foreign compiled-plugin cache file");
            let _ = std::fs::remove_file(file);
        }
    }
    component
}

fn invalid(e: wasmtime::Error) -> PluginError {
    PluginError::Invalid(crate::text::clean(
        &format!("not a WebAssembly component: {e:#}"),
        crate::text::limit::PLUGIN_MESSAGE,
    ))
}

impl Sandbox {
    fn run(&self, bytes: &[u8]) -> Result<Vec<u8>, PluginError> {
        let memory = self.memory_bytes;
        let cpu_seconds = self.timeout.as_secs() + 1;
        let mut command = Command::new(&self.program);
        command
            .args(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear();
        // SAFETY: only async-signal-safe calls (setrlimit, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let data = libc::rlimit {
                    rlim_cur: memory,
                    rlim_max: memory,
                };
                let cpu = libc::rlimit {
                    rlim_cur: cpu_seconds,
                    rlim_max: cpu_seconds,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &data) != 0
                    || libc::setrlimit(libc::RLIMIT_CPU, &cpu) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            PluginError::Invalid(format!(
                "cannot start the plugin compiler {}: {e}",
                self.program.display()
            ))
        })?;
        // Feed and drain on threads of their own, so neither pipe can stall the other.
        let mut stdin = child.stdin.take().expect("piped");
        let input = bytes.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = (&mut stdout)
                .take(MAX_ARTIFACT_BYTES as u64 + 1)
                .read_to_end(&mut out);
            out
        });
        let mut stderr = child.stderr.take().expect("piped");
        let errors = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = (&mut stderr).take(64 << 10).read_to_end(&mut out);
            out
        });
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| {
                PluginError::Invalid(format!("the plugin compiler could not be waited for: {e}"))
            })? {
                break Some(status);
            }
            if start.elapsed() >= self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = feeder.join();
        let artifact = reader.join().unwrap_or_default();
        let stderr = String::from_utf8_lossy(&errors.join().unwrap_or_default()).into_owned();
        let Some(status) = status else {
            return Err(PluginError::Invalid(format!(
                "compiling took longer than {:?} and was stopped",
                self.timeout
            )));
        };
        if status.success() && artifact.len() <= MAX_ARTIFACT_BYTES {
            return Ok(artifact);
        }
        use std::os::unix::process::ExitStatusExt;
        let message = match status.signal() {
            Some(libc::SIGXCPU) | Some(libc::SIGKILL) => format!(
                "compiling took longer than {:?} and was stopped",
                self.timeout
            ),
            _ if [
                "memory allocation",
                "out of memory",
                "failed to spawn",
                "Cannot allocate",
            ]
            .iter()
            .any(|m| stderr.contains(m)) =>
            {
                format!(
                    "compiling needed more than {} MiB and was stopped",
                    self.memory_bytes >> 20
                )
            }
            _ if status.success() => format!(
                "the compiled component is larger than {} MiB",
                MAX_ARTIFACT_BYTES >> 20
            ),
            _ => stderr
                .lines()
                .find_map(|l| l.strip_prefix("error: "))
                .map(String::from)
                .unwrap_or_else(|| format!("the plugin compiler failed ({status}): {stderr}")),
        };
        Err(PluginError::Invalid(crate::text::clean(
            &message,
            crate::text::limit::PLUGIN_MESSAGE,
        )))
    }
}

/// The child's side: reads a component from standard input, compiles it for `engine` and
/// writes the serialized form to standard output.
pub fn serve(engine: &Engine) -> Result<(), String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(super::configmap::MAX_PLUGIN_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the component: {e}"))?;
    let component = Component::new(engine, &bytes)
        .map_err(|e| format!("not a WebAssembly component: {e:#}"))?;
    let artifact = component
        .serialize()
        .map_err(|e| format!("serializing the compiled component: {e:#}"))?;
    std::io::stdout()
        .write_all(&artifact)
        .map_err(|e| format!("writing the compiled component: {e}"))
}
