//! A TCP relay that delays every byte by a link profile's one-way delay in each direction.
//!
//! The compose slow-link scenario needs 100 ms on one node's link. tc netem does that where the
//! kernel has `sch_netem`; where it does not (some VM kernels), this relay puts the same delay
//! in the path: the node announces the relay's address, and whoever dials it pays the delay.
//!
//!   link-delay --listen 0.0.0.0:31330 --to slow:31330 --profile wan-100ms

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(listen), Some(to)) = (flag("--listen"), flag("--to")) else {
        bail!(
            "usage: link-delay --listen ADDR:PORT --to HOST:PORT (--profile NAME | --delay-ms MS)"
        );
    };
    let delay_ms = match (flag("--profile"), flag("--delay-ms")) {
        (Some(p), _) => {
            let all = simulations::profiles::parse_links(simulations::profiles::LINKS_TXT)?;
            all[simulations::profiles::find(&all, &p)?].delay_ms
        }
        (None, Some(ms)) => ms.parse().context("--delay-ms")?,
        _ => bail!("give --profile NAME or --delay-ms MS"),
    };
    let delay = Duration::from_secs_f64(delay_ms / 1e3);
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("link-delay: {listen} -> {to}, +{delay_ms} ms each way");
    loop {
        let (inbound, _) = listener.accept().await?;
        let to = to.clone();
        tokio::spawn(async move {
            if let Ok(outbound) = TcpStream::connect(&to).await {
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(pump(ri, wo, delay), pump(ro, wi, delay));
            }
        });
    }
}

/// Copies `from` to `to`, each chunk released `delay` after it was read (order kept).
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin + Send + 'static,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
