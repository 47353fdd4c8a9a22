//! Per-link permission rules for block jobs (QEMU's commit case): a writer
//! on a base that an overlay reads is refused, unless the overlay's users
//! share WRITE (a job's filter above it), which makes the overlay's backing
//! edge share WRITE too (`Permissions::for_backing`).

mod common;

use std::time::Duration;

use blockgraph::driver::Filter;
use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use blockgraph::drivers::MemoryDriver;
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, Perm, Permissions};

/// A job's filter above the overlay (QEMU's `commit_top`): passes requests
/// down and shares everything on its child.
struct CommitTop;

impl Filter for CommitTop {
    const CHILD: ChildRole = ChildRole::Filtered;
    fn format_name(&self) -> &'static str {
        "commit-top"
    }
    fn child_permissions(&self, _role: ChildRole, users: Permissions) -> Permissions {
        Permissions {
            take: users.take,
            share: Perm::ALL,
        }
    }
}

#[test]
fn a_job_may_write_a_base_its_overlay_reads_only_behind_a_filter_that_shares_writes() {
    let _w = common::watchdog("job_permissions", Duration::from_secs(30));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (base, top_file) = main
        .run(|bql| {
            bql.write(|w| {
                let base = w.add_node("base", MemoryDriver::new(1 << 20), &[])?;
                let f = w.add_node("top-file", MemoryDriver::new(1 << 20), &[])?;
                Ok::<_, Error>((base, f))
            })
        })
        .unwrap();
    let f = top_file.clone();
    let driver = common::join(
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::create(f.io(&g), &CreateOptions::new(1 << 20)).await?;
            Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await
        }),
        "create",
    )
    .unwrap();
    let (b, f) = (base.clone(), top_file.clone());
    let top = main
        .run(move |bql| {
            bql.write(|w| {
                let top = w.add_node(
                    "top",
                    driver,
                    &[(ChildRole::File, &f), (ChildRole::Backing, &b)],
                )?;
                w.add_backend("vda", &top, BackendOptions::default())?;
                Ok::<_, Error>(top)
            })
        })
        .unwrap();
    let job_writer = BackendOptions {
        perms: Permissions {
            take: Perm::CONSISTENT_READ | Perm::WRITE,
            share: Perm::ALL,
        },
        stay_at_node: true,
    };
    main.run(move |bql| {
        // The guest's backend shares no WRITE: the base may not change.
        let err = bql
            .write(|w| w.add_backend("job", &base, job_writer))
            .unwrap_err();
        assert!(
            matches!(err, Error::PermissionConflict { ref node, .. } if node == "base"),
            "{err}"
        );
        // The job's filter above the overlay shares everything: now it may,
        // in one transaction with the filter.
        let drained = bql.drain(&top);
        let job = bql
            .write(|w| {
                w.transaction(|w| {
                    w.insert_filter(&drained, "commit-top", CommitTop)?;
                    w.add_backend("job", &base, job_writer)
                })
            })
            .unwrap();
        let nodes = bql.query_nodes();
        let t = nodes.iter().find(|n| n.name == "top").unwrap();
        let backing = t.children.iter().find(|c| c.role == "backing").unwrap();
        assert!(backing.share.contains("write"), "{backing:?}");
        // The filter cannot go while the job writes.
        let filter = bql.node("commit-top").unwrap().to_handle();
        let df = bql.drain(&filter);
        let err = bql.write(|w| w.remove_filter(&df)).unwrap_err();
        assert!(matches!(err, Error::PermissionConflict { .. }), "{err}");
        drop(df);
        bql.write(|w| w.remove_backend(&job)).unwrap();
    });
    drop(io);
    main.shutdown();
}
