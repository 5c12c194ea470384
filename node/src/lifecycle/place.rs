//! Where a joining node sits: the fixed range it was given, or the run of its block count
//! where the swarm is weakest.

use std::ops::Range;
use std::time::Duration;

use swarm::placement::{block_throughput, choose_blocks};
use swarm::NetHandle;

use super::ModelFile;
use crate::announce::{served, Evidence};
use crate::config::{BlockChoice, JoinConfig};
use crate::error::JoinError;
use crate::probe::Probes;

pub async fn initial(
    config: &JoinConfig,
    model: &ModelFile,
    net: &NetHandle,
) -> Result<Range<usize>, JoinError> {
    if let BlockChoice::Fixed(r) = &config.blocks {
        return Ok(r.clone());
    }
    // Nodes started together would all see the same swarm and pick the same run; a random
    // pause lets each see the choices of those before it.
    let jitter = rand::random_range(0..=config.announce_interval.as_millis().min(3000) as u64);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let block_count = model.spec.block_count as u32;
    let dim = model.spec.embedding_length;
    let mut probes = Probes::default();
    let swarm = served(
        net,
        &model.fingerprint,
        block_count,
        dim,
        &mut probes,
        Evidence::Join,
    )
    .await;
    let throughput = block_throughput(&swarm, block_count);
    let r =
        choose_blocks(&throughput, model.count as u32).ok_or(model.bad_range(0, model.count))?;
    tracing::info!(
        "chose blocks {}..{}, the weakest part of the swarm",
        r.start,
        r.end
    );
    Ok(r.start as usize..r.end as usize)
}
