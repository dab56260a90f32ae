//! Certificate pinning for Postern's TLS clients (the device client's HTTPS API client,
//! the gateway's control channel).
//!
//! Owns: [`PinnedCertVerifier`], a rustls server-certificate verifier that trusts exactly
//! one end-entity certificate, named by the SHA-256 of its DER; handshake signatures are
//! still verified with the given crypto provider (ring), and the fingerprint a mismatching
//! server presented is kept so the caller can name it in its error. Must not touch:
//! sockets, files, client configuration or certificates of its own.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// SHA-256 of `der` (a certificate's DER: the pin).
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Trusts exactly one end-entity certificate (by SHA-256 of its DER).
pub struct PinnedCertVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Fingerprint presented when it did not match (to name it in the error).
    mismatch: Mutex<Option<String>>,
}

impl fmt::Debug for PinnedCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedCertVerifier({})", hex::encode(self.pin))
    }
}

impl PinnedCertVerifier {
    /// Trusts only the certificate whose DER has SHA-256 `pin`; verifies handshake
    /// signatures with `provider`'s algorithms.
    pub fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> PinnedCertVerifier {
        PinnedCertVerifier {
            pin,
            provider,
            mismatch: Mutex::new(None),
        }
    }

    /// The pin, lowercase hex.
    pub fn pin_hex(&self) -> String {
        hex::encode(self.pin)
    }

    /// The lowercase hex fingerprint of the last certificate refused for not matching the
    /// pin (cleared by reading it): `Some` means a failed handshake was a pin mismatch.
    pub fn take_mismatch(&self) -> Option<String> {
        self.mismatch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = cert_sha256(end_entity.as_ref());
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.mismatch.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(hex::encode(presented));
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        rcgen::CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .der()
            .clone()
    }

    #[test]
    fn only_the_pinned_certificate_is_trusted_and_a_mismatch_is_named() {
        let pinned = cert();
        let other = cert();
        let v = PinnedCertVerifier::new(
            cert_sha256(&pinned),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let name = ServerName::try_from("x").expect("name");
        let now = UnixTime::now();
        assert!(v.verify_server_cert(&pinned, &[], &name, &[], now).is_ok());
        assert_eq!(v.take_mismatch(), None);
        assert!(v.verify_server_cert(&other, &[], &name, &[], now).is_err());
        assert_eq!(v.take_mismatch(), Some(hex::encode(cert_sha256(&other))));
        assert_eq!(v.take_mismatch(), None, "reading clears it");
        assert_eq!(v.pin_hex(), hex::encode(cert_sha256(&pinned)));
    }
}
