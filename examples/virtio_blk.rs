//! A virtio-blk-style device served straight from guest memory
//! (`cargo run --example virtio_blk`).
//!
//! A VMM holds its guest's RAM as a `vm_memory::GuestMemoryMmap`: here two
//! adjacent regions, each its own host mapping. The guest's driver
//! describes a request as a chain of descriptors (guest address, length):
//! a header (type and sector), data buffers scattered over guest pages,
//! one of them crossing from one region into the next, and a status byte.
//! The device model turns each data descriptor into the host regions
//! behind it and hands them to [`BlockBackend::readv`] /
//! [`BlockBackend::writev`] as an I/O vector: the qcow2 driver cuts the
//! vector at its cluster boundaries and hands each run of clusters to the
//! file below as a view of the same guest regions. No layer above the file
//! copies the data; the file driver gathers the regions into (or scatters
//! them out of) its host call's own buffer, the one copy that keeps a
//! dropped request from letting the kernel write into memory the guest got
//! back (DESIGN.md §16, §19).
//!
//! The example plays both sides: the "guest" writes a pattern into its
//! buffers and submits a write, then a read into other buffers; `main`
//! checks that the read returned the pattern and that a plain read of the
//! image agrees.
use std::error::Error as StdError;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, IoTask, IoThread, IoVec, IoVecMut, MainLoop,
    NodeHandle,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

type BoxError = Box<dyn StdError + Send + Sync>;

/// virtio-blk request types (virtio 1.2, §5.2.6) and status values.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;

/// One descriptor of a chain: a guest-physical range.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
}

/// A virtio-blk request as the guest lays it out: the header descriptor
/// (`type: le32, reserved: le32, sector: le64`), the data descriptors, and
/// the descriptor of the status byte the device writes back.
struct Request {
    header: GuestAddress,
    data: Vec<Desc>,
    status: GuestAddress,
}

/// The host memory behind `desc`: one `(pointer, length)` per guest memory
/// region it crosses (each region is a separate host mapping), or an
/// error if part of it is not guest RAM.
fn host_ranges(mem: &GuestMemoryMmap, desc: Desc) -> Result<Vec<(*mut u8, usize)>, BoxError> {
    let mut out = Vec::new();
    let mut addr = desc.addr;
    let mut left = desc.len as u64;
    while left > 0 {
        let region = mem
            .find_region(addr)
            .ok_or_else(|| format!("descriptor {desc:?} reaches outside guest memory"))?;
        let in_region = addr.0 - region.start_addr().0;
        let n = left.min(region.len() - in_region);
        // Bounds-checked by vm-memory: inside this one region.
        let slice = mem.get_slice(addr, n as usize)?;
        out.push((slice.ptr_guard_mut().as_ptr(), n as usize));
        addr = GuestAddress(addr.0 + n);
        left -= n;
    }
    Ok(out)
}

/// Whether any two of `ranges` overlap.
fn overlapping(ranges: &[(*mut u8, usize)]) -> bool {
    let mut sorted: Vec<(usize, usize)> = ranges.iter().map(|&(p, n)| (p as usize, n)).collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
}

/// Serves one request on `blk`: reads or writes the data descriptors'
/// guest memory in place, as one vectored request. Returns the status the
/// device reports to the guest.
async fn serve(
    blk: &BlockBackend,
    cx: &mut IoTask,
    mem: &GuestMemoryMmap,
    req: &Request,
) -> Result<u8, BoxError> {
    let kind: u32 = mem.read_obj(req.header)?;
    let sector: u64 = mem.read_obj(GuestAddress(req.header.0 + 8))?;
    let mut ranges = Vec::new();
    for &d in &req.data {
        ranges.extend(host_ranges(mem, d)?);
    }
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or("sector number out of range")?;
    let result = match kind {
        VIRTIO_BLK_T_IN => {
            // The device writes into these regions: Rust must see each byte
            // through one `&mut` only, so a chain whose buffers overlap is
            // refused (a guest could build one; it is its own bug).
            if overlapping(&ranges) {
                return Ok(VIRTIO_BLK_S_IOERR);
            }
            let mut segs: Vec<IoSliceMut<'_>> = ranges
                .iter()
                .map(|&(ptr, len)| {
                    // SAFETY: `ptr..ptr + len` lies inside one mapping of
                    // `mem` (`host_ranges` took it from the region's own
                    // volatile slice, bounds-checked), and `mem`, borrowed
                    // for as long as these slices live, keeps the mapping
                    // alive until the request has completed (the vector is
                    // dropped before `serve` returns). The ranges do not
                    // overlap (checked above), so no two `&mut [u8]` alias.
                    // Nothing else touches guest memory meanwhile: in a
                    // real VMM the guest hands the buffers of an in-flight
                    // request to the device and must not touch them until
                    // it sees the completion (virtio's contract); a VMM
                    // that cannot trust its guest on this keeps the default
                    // bounce path instead (copy through `read`).
                    IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
                })
                .collect();
            blk.readv(cx, offset, IoVecMut::new(&mut segs)).await
        }
        VIRTIO_BLK_T_OUT => {
            let segs: Vec<IoSlice<'_>> = ranges
                .iter()
                .map(|&(ptr, len)| {
                    // SAFETY: as above, inside a mapping that `mem` keeps
                    // alive while the slices live; the device only reads
                    // them, so overlapping buffers are harmless, and the
                    // guest does not write them while the request is in
                    // flight.
                    IoSlice::new(unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) })
                })
                .collect();
            blk.writev(cx, offset, IoVec::new(&segs)).await
        }
        _ => return Ok(VIRTIO_BLK_S_UNSUPP),
    };
    Ok(match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            eprintln!("virtio-blk: request at sector {sector} failed: {e}");
            VIRTIO_BLK_S_IOERR
        }
    })
}

/// The guest's side: writes a request header into guest memory.
fn put_header(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    kind: u32,
    sector: u64,
) -> Result<(), BoxError> {
    mem.write_obj(kind, at)?;
    mem.write_obj(0u32, GuestAddress(at.0 + 4))?;
    mem.write_obj(sector, GuestAddress(at.0 + 8))?;
    Ok(())
}

/// Opens a fresh qcow2 image of `size` bytes with 4 KiB clusters in the
/// file `path`, with a backend `vda` on it.
fn qcow2_disk(
    main: &MainLoop,
    io: &IoThread,
    path: &Path,
    size: u64,
) -> Result<BlockBackend, BoxError> {
    let file = FileDriver::create(path, 0, FileOptions::default())?;
    let file: NodeHandle = main.run(|bql| bql.write(|w| w.add_node("file", file, &[])))?;
    let f = file.clone();
    let drv = io
        .spawn(move |mut cx| async move {
            let g = cx.read().await;
            let opts = CreateOptions::new(size).cluster_size(4096);
            Qcow2Driver::create(f.io(&g), &opts).await?;
            Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await
        })
        .join()?;
    let blk = main.run(move |bql| {
        bql.write(|w| {
            let disk = w.add_node("disk", drv, &[(ChildRole::File, &file)])?;
            w.add_backend("vda", &disk, BackendOptions::default())
        })
    })?;
    Ok(blk)
}

/// Serves `req` on the I/O thread and writes its status into guest
/// memory, as the device's completion would.
fn submit(
    io: &IoThread,
    mem: &GuestMemoryMmap,
    blk: &BlockBackend,
    req: Request,
) -> Result<u8, BoxError> {
    let (m, b) = (mem.clone(), blk.clone());
    let status =
        io.spawn(move |mut cx| async move {
            serve(&b, &mut cx, &m, &req).await.map(|s| (s, req.status))
        })
        .join()?;
    mem.write_obj(status.0, status.1)?;
    Ok(status.0)
}

/// Runs the example; panics if the device returned wrong data.
pub fn main() -> Result<(), BoxError> {
    const REGION: u64 = 64 << 10;
    // Two adjacent regions of guest RAM: two host mappings.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])?;
    let dir = tempfile::tempdir()?;
    let main = MainLoop::new()?;
    let io = main.new_io_thread("virtio-blk")?;
    let blk = qcow2_disk(&main, &io, &dir.path().join("disk.qcow2"), 1 << 20)?;

    // The guest writes 12 KiB at sector 7 (byte 3584: the request starts
    // and ends inside 4 KiB clusters) from three buffers: 8 KiB crossing
    // from region 0 into region 1, 512 bytes in a page of region 0, and
    // 3.5 KiB in region 1.
    let write_data = [
        Desc {
            addr: GuestAddress(REGION - 4096),
            len: 8192,
        },
        Desc {
            addr: GuestAddress(0x3000),
            len: 512,
        },
        Desc {
            addr: GuestAddress(REGION + 0x6200),
            len: 3584,
        },
    ];
    let total: usize = write_data.iter().map(|d| d.len as usize).sum();
    let pattern: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut at = 0;
    for d in &write_data {
        mem.write_slice(&pattern[at..at + d.len as usize], d.addr)?;
        at += d.len as usize;
    }
    put_header(&mem, GuestAddress(0x100), VIRTIO_BLK_T_OUT, 7)?;
    let write = Request {
        header: GuestAddress(0x100),
        data: write_data.to_vec(),
        status: GuestAddress(0x1ff),
    };
    assert_eq!(submit(&io, &mem, &blk, write)?, VIRTIO_BLK_S_OK);

    // Then it reads the same sectors into other buffers (reusing some of
    // the memory, which it filled with garbage first): a page of region 1,
    // 6 KiB crossing the region boundary again at another place, 2 KiB in
    // region 0.
    let read_data = [
        Desc {
            addr: GuestAddress(REGION + 0x9000),
            len: 4096,
        },
        Desc {
            addr: GuestAddress(REGION - 0x800),
            len: 6144,
        },
        Desc {
            addr: GuestAddress(0x5000),
            len: 2048,
        },
    ];
    for d in &read_data {
        mem.write_slice(&vec![0xee; d.len as usize], d.addr)?;
    }
    put_header(&mem, GuestAddress(0x200), VIRTIO_BLK_T_IN, 7)?;
    let read = Request {
        header: GuestAddress(0x200),
        data: read_data.to_vec(),
        status: GuestAddress(0x2ff),
    };
    assert_eq!(submit(&io, &mem, &blk, read)?, VIRTIO_BLK_S_OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1ff))?, VIRTIO_BLK_S_OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2ff))?, VIRTIO_BLK_S_OK);

    // The guest's buffers hold what it wrote, and so does the disk.
    let mut got = Vec::new();
    for d in &read_data {
        let mut part = vec![0u8; d.len as usize];
        mem.read_slice(&mut part, d.addr)?;
        got.extend(part);
    }
    assert!(got == pattern, "the guest read back other data");
    let b = blk.clone();
    let flat = io
        .spawn(move |mut cx| async move {
            let mut flat = vec![0u8; total];
            b.read(&mut cx, 7 * SECTOR, &mut flat).await.map(|()| flat)
        })
        .join()?;
    assert!(flat == pattern, "the disk holds other data");
    let stats = blk.stats();
    assert_eq!((stats.reads, stats.writes, stats.errors), (2, 1, 0));

    // A request whose buffers overlap is refused, not served.
    let overlapping_read = Request {
        header: GuestAddress(0x200),
        data: vec![read_data[0], read_data[0]],
        status: GuestAddress(0x2ff),
    };
    assert_eq!(
        submit(&io, &mem, &blk, overlapping_read)?,
        VIRTIO_BLK_S_IOERR
    );
    println!(
        "virtio-blk: wrote and read back {total} bytes between scattered guest buffers and a qcow2 image (guest regions handed down as I/O vectors)"
    );
    drop(io);
    main.shutdown();
    Ok(())
}
