//! `cargo xtask bench containers` (registry part): one large layer pulled by skopeo from the
//! car's registry, against reading the same file and copying it locally, and the memory the
//! registry adds while it serves. The registry runs in this process exactly as the agent runs
//! it (the same `Registry` and `serve`), so this process's RSS is what serving adds to the
//! agent's. `--smoke` (what `cargo xtask test` runs): a small layer, and a failure when the copy
//! is not byte for byte or serving holds the layer in memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cardeploy_chunks::{Digest, Sha256};
use cardeploy_registry::{Catalog, Platform, Registry};
use cardeploy_testkit::oci::{LAYER_TAR, Layout};

struct Args {
    layer_mib: u64,
    out: PathBuf,
    smoke: bool,
}

fn args() -> Args {
    let mut a = Args {
        layer_mib: 1024,
        out: PathBuf::from("target/bench-containers.md"),
        smoke: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--layer-mib" => {
                a.layer_mib = it.next().expect("--layer-mib N").parse().expect("a number")
            }
            "--out" => a.out = PathBuf::from(it.next().expect("--out FILE")),
            "--smoke" => a.smoke = true,
            other => panic!("unknown argument {other}: --layer-mib N, --out FILE, --smoke"),
        }
    }
    if a.smoke {
        a.layer_mib = 16;
    }
    a
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A layer of `mib` MiB of incompressible bytes, written in pieces (never whole in memory).
fn write_layer(layout: &Layout, mib: u64) -> (Digest, u64) {
    let tmp = layout.dir.join("layer.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
    let mut h = Sha256::new();
    for i in 0..mib {
        let piece = cardeploy_testkit::noise(i + 1, 1 << 20);
        h.update(&piece);
        f.write_all(&piece).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let digest = h.finish();
    std::fs::rename(&tmp, layout.path(&digest)).unwrap();
    (digest, mib << 20)
}

/// Seconds to read `path` whole (warm, like the registry's reads after the first).
fn read_secs(path: &Path) -> f64 {
    let started = Instant::now();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    started.elapsed().as_secs_f64()
}

fn pull(addr: std::net::SocketAddr, manifest: &str, dir: &Path, dest: &Path) -> f64 {
    copy(
        &format!("docker://{addr}/bench/layer@{manifest}"),
        dir,
        dest,
    )
}

/// `skopeo copy` of `source` into the layout `dest` (emptied first); the seconds it took.
fn copy(source: &str, dir: &Path, dest: &Path) -> f64 {
    let _ = std::fs::remove_dir_all(dest);
    let started = Instant::now();
    let out = cardeploy_testkit::oci::skopeo_copy(dir, source, dest, "1")
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

fn main() {
    let args = args();
    let work = tempfile::tempdir().unwrap();
    // The copy lands in memory when it can, so the figure is the registry's, not a disk's.
    let scratch = if Path::new("/dev/shm").is_dir() && !args.smoke {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let layout = Layout::new(&work.path().join("layout"));
    let (digest, size) = write_layer(&layout, args.layer_mib);
    let layer = cardeploy_testkit::oci::Blob {
        media_type: LAYER_TAR.into(),
        digest,
        size,
    };
    let config = layout.blob(
        cardeploy_testkit::oci::OCI_CONFIG,
        format!(r#"{{"architecture":"arm64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, layer.digest_string()).as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": cardeploy_testkit::oci::OCI_MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest_string(), "size": config.size},
        "layers": [{"mediaType": LAYER_TAR, "digest": layer.digest_string(), "size": size}],
    });
    let manifest = layout.blob(
        cardeploy_testkit::oci::OCI_MANIFEST,
        manifest.to_string().as_bytes(),
    );
    layout.list(&[(&manifest, "1")]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let catalog = Catalog::from_layout(&layout.dir, "bench/layer").unwrap();
    let registry: Arc<Registry> = Registry::new(
        catalog,
        Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: None,
        },
    );
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(cardeploy_registry::serve(
        listener,
        registry,
        std::future::pending(),
    ));

    let layer_path = layout.path(&digest);
    read_secs(&layer_path); // warm the page cache once, as the registry's first hash does
    let read = read_secs(&layer_path);
    let copy_started = Instant::now();
    std::fs::copy(&layer_path, scratch.path().join("copy")).unwrap();
    let local_copy = copy_started.elapsed().as_secs_f64();
    std::fs::remove_file(scratch.path().join("copy")).unwrap();

    // RSS sampled while skopeo pulls.
    let idle = rss_kib();
    let peak = Arc::new(AtomicU64::new(idle));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The registry alone: one HTTP GET of the blob, the body thrown away as it arrives.
    let get_started = Instant::now();
    let url = format!(
        "http://{addr}/v2/bench/layer/blobs/{}",
        layer.digest_string()
    );
    let fetched = runtime.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = url.trim_start_matches(&format!("http://{addr}"));
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break total;
            }
            total += n as u64;
        }
    });
    let get = get_started.elapsed().as_secs_f64();
    assert!(
        fetched > size,
        "the GET brought {fetched} bytes for a {size}-byte blob"
    );
    let dest = scratch.path().join("pulled");
    let first = pull(addr, &manifest.digest_string(), work.path(), &dest);
    let second = pull(addr, &manifest.digest_string(), work.path(), &dest);
    // The yardstick: skopeo reading the same image straight from the file (no registry, no
    // network), so the ratio is what serving through the registry costs.
    let direct = copy(
        &format!("oci:{}:1", layout.dir.display()),
        work.path(),
        &dest,
    );
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let identical = {
        let mut h = Sha256::new();
        let mut f =
            std::fs::File::open(dest.join("blobs/sha256").join(digest.to_string())).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.finish() == digest
    };
    let added_mib = (peak.load(Ordering::Relaxed).saturating_sub(idle)) as f64 / 1024.0;
    let mib = size as f64 / f64::from(1 << 20);
    let table = format!(
        "## The car's registry\n\n\
         | figure | value |\n|---|---:|\n\
         | layer | {mib:.0} MiB |\n\
         | read the file (warm) | {read:.2} s ({:.0} MiB/s) |\n\
         | copy the file locally | {local_copy:.2} s ({:.0} MiB/s) |\n\
         | one HTTP GET of the blob, body discarded (the first: includes the registry's digest check) | {get:.2} s ({:.0} MiB/s) |\n\
         | skopeo copy, first pull | {first:.2} s ({:.0} MiB/s) |\n\
         | skopeo copy, next pull | {second:.2} s ({:.0} MiB/s) |\n\
         | skopeo copy straight from the file (the image layout on disk, no registry) | {direct:.2} s ({:.0} MiB/s) |\n\
         | **next pull vs skopeo reading the file** (target ≥ 0.8×) | **{:.2}×** |\n\
         | next pull vs reading the file in this process | {:.2}× |\n\
         | next pull vs copying the file | {:.2}× |\n\
         | RSS of the serving process: idle → peak | {:.1} → {:.1} MiB (+{added_mib:.1} MiB) |\n\
         | copy byte for byte | {identical} |\n",
        mib / read,
        mib / local_copy,
        mib / get,
        mib / first,
        mib / second,
        mib / direct,
        direct / second,
        read / second,
        local_copy / second,
        idle as f64 / 1024.0,
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.out, &table).unwrap();
    print!("{table}");
    assert!(
        identical,
        "skopeo's copy of the layer does not hash to its digest"
    );
    if args.smoke {
        // Serving streams the blob: the process never holds the layer (16 MiB) in memory.
        assert!(
            added_mib < 12.0,
            "serving a {mib:.0} MiB layer added {added_mib:.1} MiB of RSS"
        );
        println!("bench containers --smoke: the copy is exact, serving streams");
    }
}
