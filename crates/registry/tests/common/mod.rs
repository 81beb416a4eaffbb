//! The registry serving a catalog on a free loopback port, as the agent serves it on the car.

use std::net::SocketAddr;
use std::sync::Arc;

use cardeploy_registry::{Catalog, Platform, Registry};

/// A running registry; it stops when this is dropped.
pub struct Running {
    pub addr: SocketAddr,
    /// For tests that change the catalog or read what was found damaged.
    #[allow(dead_code)]
    pub registry: Arc<Registry>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `catalog` for an arm64 car (an index resolves to its arm64 image).
pub async fn serve(catalog: Catalog) -> Running {
    let arm64 = Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        variant: None,
    };
    let registry = Registry::new(catalog, arm64);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cardeploy_registry::serve(
        listener,
        registry.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    Running {
        addr,
        registry,
        _stop: stop,
    }
}
