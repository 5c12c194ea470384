//! Planning a route over a large lookup, as every client does per generation and again after
//! each refusal: 800 servers over 80 blocks, of four device speeds behind four links, placed at
//! random (seeded), as the issue-19 simulations list them.
//!
//! `cargo bench --workspace --bench plan`.

use std::collections::HashMap;

use coordinator::route::{plan_load_aware, plan_route, PlanRequest, ServerInfo};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm::load::Load;

const BLOCKS: u32 = 80;
const SERVERS: u32 = 800;

/// (ms per block, blocks held) of a GPU desktop, a laptop, a mini PC and a phone.
const DEVICES: [(f32, u32); 4] = [(1.5, 20), (4.0, 10), (12.0, 4), (30.0, 2)];
/// Round trips from a client on wifi to peers on lan, wifi, lte and a 100 ms WAN.
const RTTS: [f32; 4] = [9.0, 16.0, 78.0, 208.0];

fn lookup(seed: u64) -> Vec<ServerInfo<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..SERVERS)
        .map(|peer| {
            let (ms, len) = DEVICES[rng.random_range(0..DEVICES.len())];
            let start = rng.random_range(0..=BLOCKS - len);
            ServerInfo {
                peer,
                blocks: start..start + len,
                online: true,
                decode_ms_per_block: ms,
                rtt_ms: Some(RTTS[rng.random_range(0..RTTS.len())]),
                free_cache_tokens: rng.random_range(0..4_096),
                load: Load {
                    sessions: rng.random_range(0..8),
                    max_sessions: 16,
                    waiting_steps: rng.random_range(0..4),
                },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let servers = lookup(7);
    let banned = HashMap::new();
    let req = PlanRequest {
        blocks: 0..BLOCKS,
        cache_tokens: 256,
        now_ms: 0,
        banned_until_ms: &banned,
        default_rtt_ms: 100.0,
    };
    let mut group = c.benchmark_group("plan_800_servers_80_blocks");
    group.bench_function("plan_route", |b| b.iter(|| plan_route(&servers, &req)));
    let mut rng = StdRng::seed_from_u64(1);
    group.bench_function("plan_load_aware", |b| {
        b.iter(|| plan_load_aware(&servers, &req, &mut rng))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
