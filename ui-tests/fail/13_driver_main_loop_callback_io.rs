// Rule 13: a driver's main-loop callback issuing I/O without first taking a
// proof for it.
//
// Violation: a format driver's `open` callback (which gets a `CallbackRef`) reads
// its `File` child to probe a header.
// Expected: error[E0277]: I/O needs an `IoRef`: the proof that this task
// holds the graph read lock (`InCallback` is not `IoProof`).
use blockgraph::{driver::{require_child, BlockDriver, IoFuture}, CallbackRef, ChildRole, Error, RequestRef, Result};

/// A format whose image starts with a magic byte.
struct MagicFormat;

impl BlockDriver for MagicFormat {
    fn format_name(&self) -> &'static str {
        "magic"
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        let file = node
            .child(ChildRole::File)
            .ok_or(Error::NodeNotFound("file".into()))?;
        let mut header = [0u8; 1];
        let _probe = file.read(0, &mut header);
        Ok(())
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::File)?.length().await })
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::File)?
                .read(offset, buf)
                .await
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::File)?
                .write(offset, buf)
                .await
        })
    }
}

fn main() {
    assert_eq!(MagicFormat.format_name(), "magic");
}
