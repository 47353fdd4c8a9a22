//! [`MainTask`], the handle of an async task on the main loop.

use crate::graph::drain;
use crate::graph::proof::NodeHandle;
use crate::graph::proof::WriteLockHeld;
use crate::graph::proof::{Bql, Drained, DrainedAll, GraphWriter};
use crate::graph::runtime::MainLoop;
use crate::thread::BqlScope;

/// The handle an async main-loop task gets (see [`MainLoop::spawn`]).
///
/// It lends the [`Bql`] only to synchronous closures ([`MainTask::bql`],
/// [`MainTask::write`]): proofs borrowed from it can never be held across an
/// `.await`, where another main-loop task could change the graph. The waits
/// a main-loop task needs are async methods here and yield to the other
/// main-loop tasks instead of blocking the thread.
///
/// `!Send`: it stays on the main-loop thread.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};
///
/// let main = MainLoop::new()?;
/// let task = main.spawn(|mut cx| async move {
///     let disk = cx.bql(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))?;
///     let drained = cx.drain(&disk).await;
///     cx.write(|w| w.insert_filter(&drained, "f0", PassthroughFilter::new())).await?;
///     Ok::<_, blockgraph::Error>(cx.bql(|bql| bql.graph().nodes().count()))
/// });
/// assert_eq!(task.join()?, 2);
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
pub struct MainTask {
    bql: Bql,
}

static_assertions::assert_not_impl_any!(MainTask: Send, Sync);

impl MainTask {
    pub(crate) fn new(bql: Bql) -> Self {
        MainTask { bql }
    }

    /// Lends the [`Bql`] to synchronous code.
    ///
    /// # Panics
    ///
    /// If a `Bql` is already lent out on this thread (which safe code can
    /// only arrange by smuggling a `MainTask` into a callback).
    pub fn bql<R>(&mut self, f: impl FnOnce(&mut Bql) -> R) -> R {
        let _scope = BqlScope::enter();
        f(&mut self.bql)
    }

    /// A handle to the main loop.
    pub fn main_loop(&self) -> &MainLoop {
        self.bql.main_loop()
    }

    /// Drains `node`, yielding to other main-loop tasks while requests in
    /// flight finish. See [`Bql::drain`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future ends the section it began.
    pub async fn drain<'g>(&self, node: &'g NodeHandle) -> Drained<'g> {
        self.bql.check_graph(&node.0);
        let drained = drain::begin(&self.bql.graph, &node.0);
        drain::wait(drained_state(&drained)).await;
        drain::finish_wait(drained_state(&drained));
        drained
    }

    /// Drains every node of the graph, yielding to other main-loop tasks
    /// while requests in flight finish. See [`Bql::drain_all`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future ends the section it began.
    pub async fn drain_all(&self) -> DrainedAll {
        let drained = drain::begin_all(&self.bql.graph);
        drain::wait(drained.state()).await;
        drain::finish_wait(drained.state());
        drained
    }

    /// Takes the write section, yielding to other main-loop tasks while
    /// readers leave, then runs `f` (synchronously) inside it. See
    /// [`Bql::write`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits withdraws the writer; queued
    /// readers resume.
    pub async fn write<R>(&mut self, f: impl FnOnce(&mut GraphWriter<'_>) -> R) -> R {
        let held = WriteLockHeld::announce(&self.bql.graph);
        held.readers_gone().await;
        let _scope = BqlScope::enter();
        let _section = held.enter();
        // SAFETY: flag up, readers gone, main-loop thread, and `&mut self`
        // means no `GsRef` from this task's `Bql` is alive (the others' are
        // confined to synchronous closures that are not running now).
        let mut writer = unsafe { GraphWriter::new(&self.bql.graph) };
        f(&mut writer)
    }
}

fn drained_state<'a>(d: &'a Drained<'_>) -> &'a crate::graph::proof::DrainedState {
    d.state()
}

impl std::fmt::Debug for MainTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MainTask").finish_non_exhaustive()
    }
}
