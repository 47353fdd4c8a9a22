//! The lock's performance targets, each met or a gap, from the figures of
//! the scenarios that ran (ratios: medians of per-round ratios).

use std::time::Duration;

use crate::common::{median, median_ratio, percentile, Table};
use crate::s1_s2::{kernel, SyncResults};
use crate::s3::S3Row;
use crate::s4::S4Row;
use crate::s5;

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "GAP"
    }
}

pub fn print(sync: Option<&SyncResults>, s3: &[S3Row], s4: &[S4Row], s5: Option<&s5::Results>) {
    println!("## lock targets (median of per-round ratios)");
    let mut t = Table::new(&["mode", "target", "measured", ""]).left_aligned(2);
    let mut target = |mode: &str, what: &str, value: String, ok: bool| {
        t.row([
            mode.to_string(),
            what.to_string(),
            value,
            verdict(ok).into(),
        ]);
    };
    for (mode, ours) in [("asym", kernel("ours asym")), ("sym", kernel("ours sym"))] {
        if let Some(sync) = sync {
            let r1 = |other: &str| median_ratio(&sync.s1[ours], &sync.s1[kernel(other)]);
            let r2 = |other: &str| median_ratio(&sync.s2[kernel(other)], &sync.s2[ours]);
            let upto = [
                ("S1 ours/F0 <= 1.3", r1("F0"), 1.3),
                ("S1 ours/std <= 0.25", r1("std RwLock"), 0.25),
                ("S1 ours/parking_lot <= 0.25", r1("parking_lot"), 0.25),
                ("S1 ours/ShardedLock <= 0.25", r1("ShardedLock"), 0.25),
                ("S1 ours/F2 <= 0.4", r1("F2"), 0.4),
                (
                    "S2 per-thread/S1 <= 1.1",
                    median_ratio(&sync.s2[ours], &sync.s1[ours]),
                    1.1,
                ),
            ];
            for (what, v, limit) in upto {
                target(mode, what, format!("{v:.3}"), v <= limit);
            }
            for (what, v) in [
                ("S2 std/ours >= 10", r2("std RwLock")),
                ("S2 parking_lot/ours >= 10", r2("parking_lot")),
            ] {
                target(mode, what, format!("{v:.1}"), v >= 10.0);
            }
        }
        if let Some((_, res)) = s5.and_then(|s| s.uncontended.iter().find(|(m, _)| *m == mode)) {
            let r = |k: usize| median_ratio(&res[0], &res[k]);
            for (what, v, limit) in [
                ("S5 async/sync pair <= 1.5", r(1), 1.5),
                ("S5 async/tokio <= 0.2", r(2), 0.2),
                ("S5 async/async_lock <= 0.3", r(3), 0.3),
            ] {
                target(mode, what, format!("{v:.3}"), v <= limit);
            }
        }
        if let Some(r) = s4
            .iter()
            .find(|r| r.mode == mode && r.what == "64 idle contexts")
        {
            let p99 = percentile(&r.lat, 99.0) / 1e3;
            target(
                mode,
                "S4 64 idle: writer p99 < 50 us",
                format!("{p99:.2} us"),
                p99 < 50.0,
            );
        }
        if let Some(r) = s3
            .iter()
            .find(|r| r.mode == mode && r.period == Duration::from_millis(1))
        {
            let kept = median(&r.retained) * 100.0;
            target(
                mode,
                "S3 1 ms writer: retained >= 97%",
                format!("{kept:.2}%"),
                kept >= 97.0,
            );
        }
    }
    t.print();
    println!();
}
