//! Mutual TLS 1.3 with rustls on the ring provider (rsocket_rust only offers TLS through OpenSSL;
//! the link runs its frames over tokio-rustls itself, see `conn.rs`).
//!
//! The twin accepts a client certificate only if it chains to the fleet CA *and* its SHA-256
//! fingerprint is registered ([`PeerRegistry`]): an unknown certificate is refused during the
//! handshake, before a single RSocket frame is read.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::Error;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER bytes, lower-case hex: how the twin names a car's certificate.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of the first certificate in a PEM text.
pub fn fingerprint_pem(pem: &str) -> Result<String, Error> {
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Pem {
        path: "<certificate>".into(),
        what: "certificate",
        detail: e.to_string(),
    })?;
    Ok(fingerprint(&cert))
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::PemMissing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| Error::Pem {
        path: path.to_owned(),
        what: "private key",
        detail: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Check that `pem` holds a certificate the twin's handshake would take from a car, and return
/// its fingerprint. Registration runs the very verifier the handshake runs (WebPKI on the fleet
/// CA `ca`, with `now` as the time): it chains to the fleet CA, is within its validity period,
/// names clientAuth among its extended key usages and is not itself a CA. A certificate
/// registered without this check would be stored and then refused at every connection, or, worse,
/// be a CA certificate an operator pasted by mistake.
pub fn check_client_certificate(ca: &Path, pem: &str) -> Result<String, Error> {
    check_client_certificate_at(ca, pem, UnixTime::now())
}

/// [`check_client_certificate`] at a given time.
pub fn check_client_certificate_at(ca: &Path, pem: &str, now: UnixTime) -> Result<String, Error> {
    let refused = |why: String| Error::ClientCertificate { why };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(format!("not a PEM certificate: {e}")))?;
    let Some((end_entity, intermediates)) = certs.split_first() else {
        return Err(refused(
            "no certificate found (expected a -----BEGIN CERTIFICATE----- block)".into(),
        ));
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    verifier
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(|e| refused(refusal_reason(&e)))?;
    Ok(fingerprint(end_entity))
}

/// What an operator needs to hear about a certificate WebPKI refused.
fn refusal_reason(e: &rustls::Error) -> String {
    let rustls::Error::InvalidCertificate(cert) = e else {
        return e.to_string();
    };
    match cert {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            "not issued by this fleet's CA".into()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("expired ({e})")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("not valid yet ({e})")
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "not a client certificate: clientAuth is not among its extended key usages ({e})"
            )
        }
        CertificateError::BadEncoding => "not a valid X.509 certificate (bad DER)".into(),
        CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
            "a CA certificate, not a car's (basicConstraints cA is set)".into()
        }
        _ => e.to_string(),
    }
}

/// Paths of one side's identity: its certificate and key, and the fleet CA it trusts.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// The car side: present the car's certificate, trust only the fleet CA.
pub fn client_config(files: &TlsFiles<'_>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(files.ca)?)
        .with_client_auth_cert(load_certs(files.cert)?, load_key(files.key)?)?;
    Ok(Arc::new(config))
}

/// Which certificate belongs to which car. Shared between the TLS verifier (synchronous, during
/// the handshake) and the twin, which adds cars as they are registered.
#[derive(Clone, Default)]
pub struct PeerRegistry {
    by_fingerprint: Arc<RwLock<HashMap<String, String>>>,
}

impl fmt::Debug for PeerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerRegistry").finish_non_exhaustive()
    }
}

impl PeerRegistry {
    pub fn insert(&self, fingerprint: String, peer: String) {
        if let Ok(mut map) = self.by_fingerprint.write() {
            map.insert(fingerprint, peer);
        }
    }

    pub fn remove(&self, fingerprint: &str) {
        if let Ok(mut map) = self.by_fingerprint.write() {
            map.remove(fingerprint);
        }
    }

    pub fn lookup(&self, fingerprint: &str) -> Option<String> {
        self.by_fingerprint
            .read()
            .ok()
            .and_then(|map| map.get(fingerprint).cloned())
    }
}

/// WebPKI chain verification to the fleet CA, then the registration check.
#[derive(Debug)]
struct RegisteredClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    registry: PeerRegistry,
}

impl ClientCertVerifier for RegisteredClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.registry.lookup(&fingerprint(end_entity)).is_none() {
            tracing::warn!(
                fingerprint = %fingerprint(end_entity),
                "refused a certificate from the fleet CA that no registered car holds"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The twin side: present the twin's certificate, require a registered car certificate.
pub fn server_config(
    files: &TlsFiles<'_>,
    registry: PeerRegistry,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(files.ca)?), provider())
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let verifier = Arc::new(RegisteredClientVerifier { inner, registry });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(files.cert)?, load_key(files.key)?)?;
    // Cars reconnect to the same twin often; they do not resume sessions (each handshake proves
    // the certificate again), so keep no session cache per connection.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use cardeploy_testkit::TestPki;

    fn refusal(pki: &TestPki, pem: &str) -> String {
        match check_client_certificate(&pki.ca(), pem) {
            Err(Error::ClientCertificate { why }) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_car_certificate_of_the_fleet_ca_is_taken_with_its_fingerprint() {
        let pki = TestPki::new();
        let car = pki.car("VIN-OK");
        let fingerprint = check_client_certificate(&pki.ca(), &car.cert_pem).unwrap();
        assert_eq!(fingerprint, fingerprint_pem(&car.cert_pem).unwrap());
    }

    #[test]
    fn anything_but_a_client_certificate_of_the_fleet_ca_is_refused_with_the_reason() {
        let pki = TestPki::new();
        assert!(refusal(&pki, "x").contains("no certificate"));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(
            refusal(&pki, garbage).contains("X.509"),
            "{}",
            refusal(&pki, garbage)
        );
        let foreign = pki.foreign_car("VIN-F");
        assert!(refusal(&pki, &foreign.cert_pem).contains("not issued by this fleet's CA"));
        let server = pki.server_auth_car("VIN-S");
        assert!(refusal(&pki, &server.cert_pem).contains("clientAuth"));
        let expired = pki.expired_car("VIN-E");
        assert!(refusal(&pki, &expired.cert_pem).contains("expired"));
        let ca = refusal(&pki, pki.pki.ca.cert_pem());
        assert!(ca.contains("a CA certificate"), "{ca}");
    }
}
