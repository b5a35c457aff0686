//! Plugins in OCI registries (`oci://registry/repository:tag@sha256:...`), as Kubewarden,
//! Istio and Envoy distribute Wasm: an image whose one layer is the component
//! (`application/wasm`, the CNCF Wasm OCI artifact layout `wkg` and `oras` write).
//!
//! Pulling checks, in this order: the manifest's digest against the reference's pin; the
//! signature (when the cluster trusts keys, see [`signature`](super::signature)), before any
//! byte of the component is downloaded; the layer's declared size; and the layer's digest
//! (oci-client verifies it while streaming into a bounded buffer).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use p256::ecdsa::SigningKey;

use super::configmap::MAX_PLUGIN_BYTES;
use super::signature::{self, TrustedKeys};

/// The scheme of a plugin reference in a registry.
pub const SCHEME: &str = "oci://";
/// Layer media types of a Wasm component (the first is what [`push`](Registries::push)
/// writes).
pub const WASM_LAYER_MEDIA_TYPES: [&str; 2] = [
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
];
/// Config media type of a Wasm artifact.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// How long one pull (manifest, signatures and layer) may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses `oci://registry/repository[:tag][@sha256:...]`.
pub fn parse(text: &str) -> Result<Reference, String> {
    let rest = text.strip_prefix(SCHEME).ok_or_else(|| {
        format!("{text:?} is not an OCI reference (oci://registry/repository:tag@sha256:...)")
    })?;
    // A registry must be named: a bare `repo:tag` would silently mean Docker Hub.
    if !rest
        .split('/')
        .next()
        .is_some_and(|host| host.contains(['.', ':']) || host == "localhost")
    {
        return Err(format!(
            "{text:?} must name its registry (oci://registry.example.com/repository:tag)"
        ));
    }
    rest.parse()
        .map_err(|e| format!("{text:?} is not an OCI reference: {e}"))
}

/// A component pulled from a registry.
#[derive(Debug)]
pub struct Pulled {
    /// The component's bytes.
    pub bytes: Vec<u8>,
    /// The digest of the manifest pulled (what a pin names and cosign signs).
    pub manifest_digest: String,
    /// The trusted key that signed it, when the cluster requires signatures.
    pub signed_by: Option<String>,
}

/// How the operator and the CLI reach registries.
#[derive(Clone, Debug, Default)]
pub struct Registries {
    /// Registries (`host:port`) reached over plain HTTP: only for tests and local
    /// development.
    pub insecure: Vec<String>,
    /// The keys plugins must be signed with; empty: signatures are not required.
    pub trusted_keys: TrustedKeys,
}

impl Registries {
    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            // A plugin is one component, never a multi-platform index.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            ..ClientConfig::default()
        })
    }

    /// Pulls (and, when keys are trusted, verifies) the component at `reference`.
    pub async fn pull(&self, reference: &Reference, auth: &RegistryAuth) -> Result<Pulled, String> {
        tokio::time::timeout(PULL_TIMEOUT, self.pull_unbounded(reference, auth))
            .await
            .map_err(|_| format!("pulling {reference} took longer than {PULL_TIMEOUT:?}"))?
    }

    async fn pull_unbounded(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<Pulled, String> {
        let client = self.client();
        let (manifest, digest) = client
            .pull_image_manifest(reference, auth)
            .await
            .map_err(|e| format!("cannot pull the manifest of {reference}: {e}"))?;
        if let Some(pin) = reference.digest()
            && pin != digest
        {
            return Err(format!(
                "the registry served manifest {digest} for {reference}, not the pinned {pin}"
            ));
        }
        let signed_by = if self.trusted_keys.is_empty() {
            None
        } else {
            let layers = signatures(&client, reference, &digest, auth).await?;
            Some(self.trusted_keys.verify(&digest, &layers)?)
        };
        let layer = wasm_layer(&manifest)?;
        let bytes = pull_bounded(&client, reference, layer, MAX_PLUGIN_BYTES).await?;
        Ok(Pulled {
            bytes,
            manifest_digest: digest,
            signed_by,
        })
    }

    /// Pushes `component` to `reference` as a Wasm artifact; the manifest's digest.
    pub async fn push(
        &self,
        reference: &Reference,
        component: Vec<u8>,
        auth: &RegistryAuth,
    ) -> Result<String, String> {
        let client = self.client();
        let layer = ImageLayer::new(component, WASM_LAYER_MEDIA_TYPES[0].into(), None);
        let config = Config::new(
            br#"{"architecture":"wasm","os":"wasip2"}"#.to_vec(),
            WASM_CONFIG_MEDIA_TYPE.into(),
            None,
        );
        client
            .push(reference, &[layer], config, auth, None)
            .await
            .map_err(|e| format!("cannot push to {reference}: {e}"))?;
        client
            .fetch_manifest_digest(reference, auth)
            .await
            .map_err(|e| format!("pushed, but cannot read back the digest of {reference}: {e}"))
    }

    /// Signs the manifest `reference` names (its pin, or what its tag points to now) with
    /// `key`, storing the signature where cosign does; the digest signed.
    pub async fn sign(
        &self,
        reference: &Reference,
        key: &SigningKey,
        auth: &RegistryAuth,
    ) -> Result<String, String> {
        let client = self.client();
        let digest = match reference.digest() {
            Some(d) => d.to_string(),
            None => client
                .fetch_manifest_digest(reference, auth)
                .await
                .map_err(|e| format!("cannot read the digest of {reference}: {e}"))?,
        };
        let repository = format!("{}/{}", reference.registry(), reference.repository());
        let payload = signature::payload(&repository, &digest);
        let annotations = BTreeMap::from([(
            signature::SIGNATURE_ANNOTATION.to_string(),
            signature::sign(key, &payload),
        )]);
        let layer = ImageLayer::new(
            payload,
            signature::PAYLOAD_MEDIA_TYPE.into(),
            Some(annotations),
        );
        let config = Config::oci_v1(b"{}".to_vec(), None);
        let target = signature_reference(reference, &digest);
        client
            .push(&target, &[layer], config, auth, None)
            .await
            .map_err(|e| format!("cannot push the signature to {target}: {e}"))?;
        Ok(digest)
    }
}

fn signature_reference(reference: &Reference, digest: &str) -> Reference {
    Reference::with_tag(
        reference.registry().to_string(),
        reference.repository().to_string(),
        signature::signature_tag(digest),
    )
}

/// The signature layers (payload, base64 signature) cosign stored for `digest`.
async fn signatures(
    client: &Client,
    reference: &Reference,
    digest: &str,
    auth: &RegistryAuth,
) -> Result<Vec<(Vec<u8>, String)>, String> {
    let target = signature_reference(reference, digest);
    let (manifest, _) = client
        .pull_image_manifest(&target, auth)
        .await
        .map_err(|e| format!("{digest} is not signed (no signature at {target}: {e})"))?;
    let mut found = Vec::new();
    for layer in manifest
        .layers
        .iter()
        .filter(|l| l.media_type == signature::PAYLOAD_MEDIA_TYPE)
        .take(signature::MAX_SIGNATURES)
    {
        let Some(sig) = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(signature::SIGNATURE_ANNOTATION))
        else {
            continue;
        };
        let payload = pull_bounded(client, &target, layer, signature::MAX_PAYLOAD_BYTES).await?;
        found.push((payload, sig.clone()));
    }
    Ok(found)
}

/// The one Wasm layer of a plugin image.
fn wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    let mut wasm = manifest
        .layers
        .iter()
        .filter(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()));
    match (wasm.next(), wasm.next()) {
        (Some(layer), None) => Ok(layer),
        (None, _) => Err(format!(
            "the image has no Wasm layer (media type {})",
            WASM_LAYER_MEDIA_TYPES.join(" or ")
        )),
        (Some(_), Some(_)) => Err("the image has more than one Wasm layer".into()),
    }
}

/// Downloads a blob of at most `limit` bytes (declared and actual), digest-checked.
async fn pull_bounded(
    client: &Client,
    reference: &Reference,
    layer: &OciDescriptor,
    limit: usize,
) -> Result<Vec<u8>, String> {
    if layer.size < 0 || layer.size as u64 > limit as u64 {
        return Err(format!(
            "layer {} declares {} bytes, more than the limit of {limit}",
            layer.digest, layer.size
        ));
    }
    let mut out = Bounded {
        bytes: Vec::with_capacity(layer.size as usize),
        limit,
    };
    client
        .pull_blob(reference, layer, &mut out)
        .await
        .map_err(|e| format!("cannot pull layer {} of {reference}: {e}", layer.digest))?;
    Ok(out.bytes)
}

/// A buffer that refuses to grow past its limit (a registry may send more than it
/// declared).
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.limit {
            return Poll::Ready(Err(std::io::Error::other(format!(
                "the blob is larger than {} bytes",
                self.limit
            ))));
        }
        self.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The credentials for `registry` in a `kubernetes.io/dockerconfigjson` pull secret
/// (`.dockerconfigjson`); anonymous when it has none for that registry.
pub fn auth_from_docker_config(json: &[u8], registry: &str) -> Result<RegistryAuth, String> {
    let config: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| format!("the pull secret is not a Docker config: {e}"))?;
    let Some(entry) = config["auths"].as_object().and_then(|auths| {
        auths.iter().find_map(|(host, entry)| {
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            (host == registry).then_some(entry)
        })
    }) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let (Some(user), Some(password)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Ok(RegistryAuth::Basic(user.into(), password.into()));
    }
    let encoded = entry["auth"]
        .as_str()
        .ok_or_else(|| format!("the pull secret's entry for {registry} has no credentials"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|d| String::from_utf8(d).ok())
        .ok_or_else(|| {
            format!("the pull secret's auth for {registry} is not base64 user:password")
        })?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| format!("the pull secret's auth for {registry} is not user:password"))?;
    Ok(RegistryAuth::Basic(user.into(), password.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_their_registry_and_may_pin_a_digest() {
        let pinned = "oci://127.0.0.1:5000/plugins/scaler:1.0@sha256:4b0c5e0a9f3a7d1e2c6b8a9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b";
        let r = parse(pinned).unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "plugins/scaler");
        assert_eq!(r.tag(), Some("1.0"));
        assert!(r.digest().unwrap().starts_with("sha256:4b0c"));
        assert!(parse("oci://ghcr.io/acme/scaler:2").is_ok());
        assert!(
            parse("ghcr.io/acme/scaler:2")
                .unwrap_err()
                .contains("not an OCI reference")
        );
        assert!(
            parse("oci://acme/scaler:2")
                .unwrap_err()
                .contains("must name its registry")
        );
        assert!(parse("oci://ghcr.io/UPPER/x").is_err());
    }

    #[test]
    fn pull_secrets_give_basic_credentials_for_their_registry() {
        let secret = br#"{"auths": {
            "https://ghcr.io": {"auth": "dXNlcjpwYXNzOndvcmQ="},
            "registry.example.com": {"username": "u", "password": "p"}
        }}"#;
        assert_eq!(
            auth_from_docker_config(secret, "ghcr.io").unwrap(),
            RegistryAuth::Basic("user".into(), "pass:word".into())
        );
        assert_eq!(
            auth_from_docker_config(secret, "registry.example.com").unwrap(),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        assert_eq!(
            auth_from_docker_config(secret, "quay.io").unwrap(),
            RegistryAuth::Anonymous
        );
        assert!(auth_from_docker_config(b"nope", "quay.io").is_err());
        let broken = br#"{"auths": {"ghcr.io": {"auth": "!!"}}}"#;
        assert!(auth_from_docker_config(broken, "ghcr.io").is_err());
    }

    #[test]
    fn a_plugin_image_has_exactly_one_wasm_layer() {
        let layer = |media: &str| OciDescriptor {
            media_type: media.into(),
            ..OciDescriptor::default()
        };
        let manifest = |layers| OciImageManifest {
            layers,
            ..OciImageManifest::default()
        };
        assert!(wasm_layer(&manifest(vec![layer("application/wasm")])).is_ok());
        assert!(
            wasm_layer(&manifest(vec![layer(
                "application/vnd.oci.image.layer.v1.tar"
            )]))
            .unwrap_err()
            .contains("no Wasm layer")
        );
        let two = manifest(vec![layer("application/wasm"), layer("application/wasm")]);
        assert!(wasm_layer(&two).unwrap_err().contains("more than one"));
    }
}
