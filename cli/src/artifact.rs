//! `cardeploy artifact`: chunk a file (an OS rootfs image, a container layer tar) the way cars
//! do, and push to the twin only the chunks it does not have yet.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cardeploy_chunks::{ChunkIndex, Digest, Params, chunk_file, chunk_reader};
use cardeploy_protocol::api::{ChunkList, IndexView, MissingChunks};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{Api, ApiArgs};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Chunk FILE, upload the chunks the twin lacks (zstd-compressed), then its chunk index.
    /// Prints the index id: name it in a desired state with
    /// `cardeploy car set-desired CAR --release R --artifact NAME=INDEX`.
    Push {
        file: PathBuf,
        /// zstd level of uploaded chunks (what cars receive when no delta is smaller).
        #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print FILE's chunk index id and statistics without uploading anything.
    Index { file: PathBuf },
    /// Show a chunk index the twin holds.
    Show {
        index: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A byte progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Index { file } => {
            let index = chunk_file(&file, Params::DEFAULT, |_| Ok(()))
                .with_context(|| format!("chunking {}", file.display()))?;
            println!(
                "{}  {} bytes, {} chunks, sha256 {}",
                index.id(),
                index.size,
                index.chunks.len(),
                index.artifact
            );
            Ok(())
        }
        Command::Show { index, api } => {
            let view: IndexView =
                Api::new(&api)?.get("reading the index", &format!("/api/v1/indexes/{index}"))?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
        Command::Push { file, level, api } => push(&file, level, &api),
    }
}

fn push(file: &Path, level: i32, args: &ApiArgs) -> anyhow::Result<()> {
    let api = Api::new(args)?;
    let index = push_file(&api, file, level)?;
    println!("{}", index.id());
    Ok(())
}

/// Chunk `file` the way cars do, with a progress bar labelled `label`.
pub(crate) fn chunk(file: &Path, label: &str) -> anyhow::Result<ChunkIndex> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let scan = bar(size, label);
    let index = chunk_file(file, Params::DEFAULT, |c| {
        scan.inc(c.data.len() as u64);
        Ok(())
    })
    .with_context(|| format!("chunking {}", file.display()))?;
    scan.finish_and_clear();
    Ok(index)
}

/// Chunk `file` and push it: the chunks the twin lacks, then the chunk index.
pub(crate) fn push_file(api: &Api, file: &Path, level: i32) -> anyhow::Result<ChunkIndex> {
    let index = chunk(file, "chunking")?;
    push_index(api, file, &file.display().to_string(), &index, level)?;
    Ok(index)
}

/// Push an artifact already chunked into `index`: ask the twin which chunks it lacks, upload
/// those (cut again from `file`, which must still match `index`), then PUT the index.
/// `label` names the artifact in what is printed.
pub(crate) fn push_index(
    api: &Api,
    file: &Path,
    label: &str,
    index: &ChunkIndex,
    level: i32,
) -> anyhow::Result<()> {
    let mut ids: Vec<String> = index.chunks.iter().map(|c| c.id.hex()).collect();
    ids.sort();
    ids.dedup();
    let mut missing: HashSet<Digest> = HashSet::new();
    for batch in ids.chunks(MISSING_BATCH) {
        let answer: MissingChunks = api.post(
            "asking which chunks the twin lacks",
            "/api/v1/chunks/missing",
            &ChunkList {
                chunks: batch.to_vec(),
            },
        )?;
        for id in &answer.missing {
            let id = id
                .parse::<Digest>()
                .map_err(|_| anyhow::anyhow!("the twin named `{id}` as missing: not a chunk id"))?;
            missing.insert(id);
        }
    }
    let missing_bytes: u64 = {
        let mut seen = HashSet::new();
        index
            .chunks
            .iter()
            .filter(|c| missing.contains(&c.id) && seen.insert(c.id))
            .map(|c| u64::from(c.len))
            .sum()
    };
    eprintln!(
        "{label}: {} chunks, {} of them ({:.1} MiB) not on the twin yet",
        index.chunks.len(),
        missing.len(),
        missing_bytes as f64 / 1048576.0
    );

    if !missing.is_empty() {
        upload(file, index, &missing, missing_bytes, level, api)?;
    }

    let id = index.id();
    let view: IndexView = api.put_bytes(
        "uploading the chunk index",
        &format!("/api/v1/indexes/{id}"),
        &index.encode(),
    )?;
    eprintln!(
        "{label}: on the twin ({} bytes in {} chunks; {} chunks uploaded now, the rest were there)",
        view.size,
        index.chunks.len(),
        missing.len()
    );
    Ok(())
}

/// Chunk ids per `POST /api/v1/chunks/missing` (the twin takes at most 10,000).
const MISSING_BATCH: usize = 10_000;

/// Upload threads at most, whatever the machine: a twin serves a limited number of uploads at
/// once (16 by default) and answers the rest 429, and other pipelines push to it too.
const MAX_UPLOAD_THREADS: usize = 8;

/// Compress and upload the missing chunks on up to [`MAX_UPLOAD_THREADS`] cores: one thread
/// cuts the file again (memory: a few chunks in flight), the others compress at `level` and
/// PUT (a busy twin's 429 is retried with backoff, see `Api`).
fn upload(
    file: &Path,
    index: &ChunkIndex,
    missing: &HashSet<Digest>,
    missing_bytes: u64,
    level: i32,
    api: &Api,
) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_UPLOAD_THREADS);
    let progress = bar(missing_bytes, "uploading");
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Digest, Vec<u8>)>(workers * 2);
    let rx = std::sync::Mutex::new(rx);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let again = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 0..workers {
            handles.push(scope.spawn(|| -> anyhow::Result<()> {
                loop {
                    let next = rx
                        .lock()
                        .map_err(|_| anyhow::anyhow!("worker poisoned"))?
                        .recv();
                    let Ok((id, data)) = next else { return Ok(()) };
                    let result = zstd::bulk::compress(&data, level)
                        .context("compressing a chunk")
                        .and_then(|z| {
                            api.put_bytes_unit(
                                "uploading a chunk",
                                &format!("/api/v1/chunks/{id}"),
                                &z,
                            )
                        });
                    if let Err(e) = result {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(e);
                    }
                    progress.inc(data.len() as u64);
                }
            }));
        }
        let mut sent = HashSet::new();
        let cut = std::fs::File::open(file)
            .with_context(|| format!("opening {}", file.display()))
            .and_then(|f| {
                chunk_reader(
                    std::io::BufReader::with_capacity(1 << 20, f),
                    Params::DEFAULT,
                    |c| {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(());
                        }
                        if missing.contains(&c.id) && sent.insert(c.id) {
                            // A closed channel means every worker failed; their errors are reported.
                            let _ = tx.send((c.id, c.data.to_vec()));
                        }
                        Ok(())
                    },
                )
                .with_context(|| format!("reading {}", file.display()))
            });
        drop(tx);
        let mut first_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow::anyhow!("an upload worker panicked"));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => cut,
        }
    })?;
    progress.finish_and_clear();
    if again.id() != index.id() {
        anyhow::bail!(
            "{} changed while it was being pushed; push it again once it is stable",
            file.display()
        );
    }
    Ok(())
}
