//! The controller's client-API TLS identity: a self-signed ECDSA P-256 certificate and its
//! key, created once and then reused, so clients can pin its fingerprint.
//!
//! Owns: the API directory (`api/` beside the `--db` file unless `--api-dir` says
//! otherwise; mode 0700), `cert.pem` (0644) and `key.pem` (0600, written without a window
//! in which it is readable by others), and the fingerprint (SHA-256 of the certificate
//! DER, lowercase hex) that invite tokens carry. Must not touch: the TLS server itself
//! (see `api`) or the registry.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

/// Certificate file name inside the API directory.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file name inside the API directory.
pub const KEY_FILE: &str = "key.pem";

/// Why the identity could not be loaded or created. One line each, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ApiIdentityError {
    #[error("API identity {}: {source}: check the directory or pass another --api-dir", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API identity {}: {what}: move the directory away to create a new identity (clients enrolled with the old fingerprint must then be re-invited)", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("API private key {} is readable by others: run `chmod 600 {}`", .0.display(), .0.display())]
    KeyPermissions(PathBuf),
    #[error("cannot generate the API certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The loaded identity.
#[derive(Debug)]
pub struct ApiIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// Lowercase hex SHA-256 of `cert`.
    pub fingerprint: String,
}

impl ApiIdentity {
    /// The fingerprint as bytes.
    pub fn fingerprint_bytes(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, self.cert.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// The default API directory: `api/` beside the database file.
pub fn default_dir(db: &Path) -> PathBuf {
    match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("api"),
        _ => PathBuf::from("api"),
    }
}

/// Loads the identity from `dir`, creating directory, key and certificate if absent.
pub fn load_or_create(dir: &Path) -> Result<ApiIdentity, ApiIdentityError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ApiIdentityError::Io { path, source }
    };
    if !cert_path.exists() && !key_path.exists() {
        create(dir, &cert_path, &key_path)?;
    }
    let key_meta = fs::metadata(&key_path).map_err(io(&key_path))?;
    if key_meta.permissions().mode() & 0o077 != 0 {
        return Err(ApiIdentityError::KeyPermissions(key_path));
    }
    let cert =
        CertificateDer::from_pem_file(&cert_path).map_err(|e| ApiIdentityError::Invalid {
            path: cert_path.clone(),
            what: format!("not a PEM certificate ({e})"),
        })?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| ApiIdentityError::Invalid {
        path: key_path.clone(),
        what: format!("not a PEM private key ({e})"),
    })?;
    let fingerprint = postern_protocol::api_auth::sha256_hex(cert.as_ref());
    Ok(ApiIdentity {
        cert,
        key,
        fingerprint,
    })
}

fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), ApiIdentityError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ApiIdentityError::Io { path, source }
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![
        "postern-controller".to_owned(),
        "localhost".to_owned(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postern-controller API");
    let cert = params.self_signed(&key)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    // Key first (0600 from creation on, never replaced), then the certificate.
    write_new(key_path, key_pem.as_bytes(), 0o600).map_err(io(key_path))?;
    write_new(cert_path, cert.pem().as_bytes(), 0o644).map_err(io(cert_path))?;
    Ok(())
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_with_a_private_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = dir.path().join("api");
        let first = load_or_create(&api).expect("create");
        let mode = fs::metadata(api.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(&api).expect("dir").permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let second = load_or_create(&api).expect("load");
        assert_eq!(
            first.fingerprint, second.fingerprint,
            "reused, not recreated"
        );
        assert_eq!(first.fingerprint.len(), 64);
        assert_eq!(hex::encode(first.fingerprint_bytes()), first.fingerprint);
        fs::set_permissions(api.join(KEY_FILE), fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(&api)
            .expect_err("0644 key refused")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn default_dir_is_beside_the_database() {
        assert_eq!(
            default_dir(Path::new("/var/lib/postern/registry.db")),
            PathBuf::from("/var/lib/postern/api")
        );
        assert_eq!(default_dir(Path::new("registry.db")), PathBuf::from("api"));
    }
}
