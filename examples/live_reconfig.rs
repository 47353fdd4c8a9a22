//! Live reconfiguration under I/O: the main example.
//!
//! Two I/O threads write and verify data through one backend while the main
//! loop keeps changing the graph underneath: it inserts and removes filters
//! and takes snapshots (appends copy-on-write overlays). Every request is
//! checked; at the end the whole disk is read back and compared with what
//! the writers wrote, and the final graph is printed as Graphviz DOT.
//!
//! `cargo run --release --example live_reconfig [-- --seconds N]`
//!
//! The overlay driver below is a complete user-defined driver: its I/O
//! callbacks get a `RequestRef` and read from their backing child with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockgraph::drivers::{MemoryDriver, PassthroughFilter};
use blockgraph::{
    driver::{require_child, BlockDriver, IoFuture},
    BackendOptions, ChildRole, Error, MainLoop, RequestRef, Result,
};

const DISK_SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;

/// A RAM overlay: blocks written here are stored here; the others are read
/// from the backing node. A snapshot, minus the image file.
#[derive(Default)]
struct CowOverlay {
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
    /// Serialises copy-ups (read backing, then store) against each other.
    copy_up: tokio::sync::Mutex<()>,
}

impl CowOverlay {
    fn stored(&self, block: u64) -> Option<Vec<u8>> {
        self.blocks.lock().unwrap().get(&block).cloned()
    }
}

impl BlockDriver for CowOverlay {
    fn format_name(&self) -> &'static str {
        "cow-overlay"
    }

    fn describe(&self) -> String {
        format!(
            "cow-overlay, {} blocks stored",
            self.blocks.lock().unwrap().len()
        )
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::Backing)?.length().await })
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let backing = require_child(node, ChildRole::Backing)?;
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let (block, within) = (pos / BLOCK, (pos % BLOCK) as usize);
                let n = (BLOCK as usize - within).min(buf.len() - done);
                let out = &mut buf[done..done + n];
                match self.stored(block) {
                    Some(data) => out.copy_from_slice(&data[within..within + n]),
                    None => backing.read(pos, out).await?,
                }
                done += n;
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let backing = require_child(node, ChildRole::Backing)?;
            let _copy_up = self.copy_up.lock().await;
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let (block, within) = (pos / BLOCK, (pos % BLOCK) as usize);
                let n = (BLOCK as usize - within).min(buf.len() - done);
                let mut data = match self.stored(block) {
                    Some(data) => data,
                    None => {
                        let mut data = vec![0u8; BLOCK as usize];
                        backing.read(block * BLOCK, &mut data).await?;
                        data
                    }
                };
                data[within..within + n].copy_from_slice(&buf[done..done + n]);
                self.blocks.lock().unwrap().insert(block, data);
                done += n;
            }
            Ok(())
        })
    }
}

/// What one writer thread did.
#[derive(Debug, Default)]
struct Traffic {
    writes: u64,
    reads: u64,
    bytes: u64,
}

fn pattern(thread: u64, round: u64, block: u64) -> Vec<u8> {
    let seed = (thread << 40) ^ (round << 20) ^ block;
    (0..BLOCK)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i) % 251) as u8)
        .collect()
}

fn main() -> Result<()> {
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map(|s| {
            s.parse()
                .map_err(|_| Error::InvalidArgument(format!("bad --seconds: {s}")))
        })
        .transpose()?
        .unwrap_or(2);

    let main = MainLoop::new()?;
    let (disk, blk) = main.run(|bql| {
        bql.write(|w| {
            let disk = w.add_node("disk", MemoryDriver::new(DISK_SIZE), &[])?;
            let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
            Ok::<_, Error>((disk, blk))
        })
    })?;
    println!(
        "graph: backend 'vda' -> memory node 'disk' ({} MiB)",
        DISK_SIZE >> 20
    );

    // Two I/O threads, each owning half of the disk: write a block, read it
    // back, check it, over and over. Each remembers what it last wrote.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2)
        .map(|i| main.new_io_thread(&format!("io{i}")))
        .collect::<Result<_>>()?;
    let half_blocks = DISK_SIZE / BLOCK / 2;
    let workers: Vec<_> = threads
        .iter()
        .enumerate()
        .map(|(i, io)| {
            let (blk, stop) = (blk.clone(), stop.clone());
            let thread = i as u64;
            io.spawn(move |mut cx| async move {
                let mut traffic = Traffic::default();
                let mut last: HashMap<u64, u64> = HashMap::new();
                let mut round = 0u64;
                let mut buf = vec![0u8; BLOCK as usize];
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let block = thread * half_blocks + (round * 7919) % half_blocks;
                    let data = pattern(thread, round, block);
                    blk.write(&mut cx, block * BLOCK, &data).await?;
                    blk.read(&mut cx, block * BLOCK, &mut buf).await?;
                    if buf != data {
                        return Err(Error::InvalidArgument(format!(
                            "io{thread}: block {block} read back wrong data"
                        )));
                    }
                    last.insert(block, round);
                    traffic.writes += 1;
                    traffic.reads += 1;
                    traffic.bytes += 2 * BLOCK;
                }
                Ok::<_, Error>((traffic, last))
            })
        })
        .collect();

    // Meanwhile, the main loop reshapes the graph under the traffic.
    let started = Instant::now();
    let (r, d) = (rounds.clone(), disk.clone());
    let reconfig = main.spawn(move |mut cx| async move {
        let mut log = Vec::new();
        let mut drain_waits = Vec::new();
        let mut top = d; // the node the backend currently uses
        let mut snapshots = 0;
        while started.elapsed() < Duration::from_secs(seconds) {
            let round = r.fetch_add(1, Ordering::Relaxed);
            // Insert a filter above the current top...
            let t = Instant::now();
            let drained = cx.drain(&top).await;
            drain_waits.push(t.elapsed());
            let name = format!("filter{round}");
            let filter = cx
                .write(|w| w.insert_filter(&drained, &name, PassthroughFilter::new()))
                .await?;
            drop(drained);
            log.push(format!("inserted {name}"));
            tokio::time::sleep(Duration::from_millis(5)).await;

            // ...take a snapshot of what is below it every fourth round...
            if round % 4 == 0 && snapshots < 3 {
                let drained = cx.drain(&top).await;
                let snap = format!("snap{snapshots}");
                let overlay = cx
                    .write(|w| w.append_overlay(&drained, &snap, CowOverlay::default(), &[]))
                    .await?;
                drop(drained);
                log.push(format!("snapshot {snap} on top of {}", top.name()));
                top = overlay;
                snapshots += 1;
            }

            // ...and take the filter out again.
            let drained = cx.drain(&filter).await;
            cx.write(|w| w.remove_filter(&drained)).await?;
            drop(drained);
            log.push(format!("removed {name}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mutations = cx.bql(|bql| bql.graph().mutation_count());
        Ok::<_, Error>((log, drain_waits, mutations))
    });
    let (log, mut drain_waits, mutations) = reconfig.join()?;
    stop.store(true, Ordering::Relaxed);

    let mut expected: HashMap<u64, (u64, u64)> = HashMap::new();
    for (thread, worker) in workers.into_iter().enumerate() {
        let (traffic, last) = worker.join()?;
        println!(
            "io{thread}: {} writes + {} reads verified, {:.1} MiB",
            traffic.writes,
            traffic.reads,
            traffic.bytes as f64 / (1 << 20) as f64
        );
        for (block, round) in last {
            expected.insert(block, (thread as u64, round));
        }
    }

    // Read the whole disk back through the final graph and compare.
    let check = blk.clone();
    let mismatches = threads[0]
        .spawn(move |mut cx| async move {
            let mut buf = vec![0u8; BLOCK as usize];
            let mut bad = 0u64;
            for block in 0..DISK_SIZE / BLOCK {
                check.read(&mut cx, block * BLOCK, &mut buf).await?;
                let want = match expected.get(&block) {
                    Some(&(thread, round)) => pattern(thread, round, block),
                    None => vec![0u8; BLOCK as usize],
                };
                bad += u64::from(buf != want);
            }
            Ok::<_, Error>(bad)
        })
        .join()?;

    drain_waits.sort();
    let median = drain_waits
        .get(drain_waits.len() / 2)
        .copied()
        .unwrap_or_default();
    let inserts = log.iter().filter(|l| l.starts_with("inserted")).count();
    let snaps = log.iter().filter(|l| l.starts_with("snapshot")).count();
    println!("main loop: {mutations} graph mutations ({inserts} filters inserted and removed, {snaps} snapshots)");
    for line in log.iter().filter(|l| l.starts_with("snapshot")) {
        println!("  {line}");
    }
    println!(
        "drains: {} (median wait for in-flight requests {:?}); requests that queued behind a drain: {}",
        drain_waits.len(),
        median,
        blk.queued_requests()
    );
    println!("final check: whole disk read back, {mismatches} mismatching blocks");
    println!("final graph:");
    print!("{}", main.run(|bql| bql.graph().to_dot()));

    drop(threads);
    main.shutdown();
    if mismatches != 0 {
        return Err(Error::InvalidArgument(format!("{mismatches} blocks lost")));
    }
    Ok(())
}
