pub mod bench;
pub mod chat;
pub mod client;
pub mod compute_args;
pub mod config;
pub mod generate;
pub mod join;
pub mod net_args;
pub mod prefix_cache;
pub mod serve_api;
pub mod status;
pub mod swarm_key;

use anyhow::Context;

/// The longest wait any seconds flag takes: a day. Bounded where it is parsed, so that a value
/// like 18446744073709551615 is a usage error naming the flag instead of a panic where it is
/// added to the clock (`Instant + Duration` overflows); every default is far inside it.
pub const MAX_SECS: u64 = 86_400;

/// Sizes rayon's pool (attention, prompt-wide work) and the compute team the matrix products
/// run on. Defaults to all cores.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("compute-{i}"))
        .build_global()
        .context("starting the compute threads")?;
    // The matrix products of a forward pass run on a team that stays awake between them.
    model::team::init(n);
    Ok(n)
}

/// Opens the whole model with a progress bar and a log line saying what was loaded.
pub fn open_local(path: &std::path::Path) -> anyhow::Result<model::LocalModel> {
    let started = std::time::Instant::now();
    let (bar, mut progress) = node::progress::loading_bar(&path.display().to_string());
    let model = model::LocalModel::open(path, &mut progress);
    bar.finish_and_clear();
    let model = model?;
    let spec = model.spec();
    tracing::info!(
        model = spec.name.as_deref().unwrap_or("?"),
        arch = %spec.architecture,
        blocks = spec.block_count,
        weights_mib = format!("{:.1}", crate::rss::mib(model.slice.weight_bytes() as u64)),
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "model loaded"
    );
    Ok(model)
}

/// The async runtime of every networked command. Compute has its own threads (rayon and the
/// compute thread), so two I/O workers are plenty.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A token cancelled on Ctrl-C or SIGTERM (how docker and systemd stop a service).
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}
