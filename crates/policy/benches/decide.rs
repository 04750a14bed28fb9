//! How decision time grows with the number of policies, sliced against unsliced, so that
//! the "policy evaluation stays flat" budget in DESIGN.md is held by a measurement.
//!
//! Run: `cargo bench -p policy --bench decide`. Each request is timed on its own and
//! recorded in a histogram; p50 and p99 are printed in µs per policy-set size. The workload
//! comes from `policy::synthetic`, which `control`'s `decision` benchmark shares.

use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

use hdrhistogram::Histogram;
use model::Decision;
use policy::synthetic::{OwnedCall, Rng, World};
use policy::{CallRequest, PolicyEngine};

const SCHEMA: &str = include_str!("../../../policies/remit.cedarschema");
const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
/// 2023-11-14T22:13:20Z.
const NOW: i64 = 1_700_000_000;

fn main() -> Result<(), Box<dyn Error>> {
    println!(
        "{:>8} {:>7} {:>6} {:>9} | {:>12} {:>12} | {:>12} {:>12} | decisions (allow/deny/approval)",
        "policies",
        "agents",
        "tools",
        "load ms",
        "sliced p50",
        "sliced p99",
        "full p50",
        "full p99"
    );
    for size in SIZES {
        let world = World::new(size);
        let text = world.policies(&mut Rng::new(0x5EED ^ size as u64));
        let started = Instant::now();
        let engine = PolicyEngine::from_sources(SCHEMA, &[("bench.cedar", &text)])?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(engine.policy_count(), size);

        let requests = world.requests(&mut Rng::new(0xCA11 ^ size as u64), 2_000, NOW);
        let mut decisions = [0usize; 3];
        let sliced = measure(&requests, 20_000, |request| {
            let report = engine.decide_call(request);
            decisions[match report.decision {
                Decision::Allow => 0,
                Decision::Deny => 1,
                Decision::ApprovalRequired => 2,
            }] += 1;
            black_box(report);
        })?;
        // Unsliced evaluation costs about a microsecond per policy: bound the total work.
        let full_iterations = (2_000_000 / size).clamp(200, 20_000);
        let full = measure(&requests, full_iterations, |request| {
            black_box(engine.decide_call_unsliced(request));
        })?;
        println!(
            "{size:>8} {:>7} {:>6} {load_ms:>9.1} | {:>9.1} µs {:>9.1} µs | {:>9.1} µs {:>9.1} µs | {}/{}/{}",
            world.agents,
            world.tools,
            micros(sliced.value_at_quantile(0.5)),
            micros(sliced.value_at_quantile(0.99)),
            micros(full.value_at_quantile(0.5)),
            micros(full.value_at_quantile(0.99)),
            decisions[0],
            decisions[1],
            decisions[2],
        );
    }
    Ok(())
}

/// Time `iterations` decisions (after a warm-up), cycling through `requests`.
fn measure(
    requests: &[OwnedCall],
    iterations: usize,
    mut decide: impl FnMut(&CallRequest<'_>),
) -> Result<Histogram<u64>, Box<dyn Error>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for owned in requests.iter().take(iterations.min(200)) {
        decide(&owned.request());
    }
    for i in 0..iterations {
        let owned = &requests[i % requests.len()];
        let request = owned.request();
        let started = Instant::now();
        decide(&request);
        histogram.record(started.elapsed().as_nanos().max(1) as u64)?;
    }
    Ok(histogram)
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1e3
}
