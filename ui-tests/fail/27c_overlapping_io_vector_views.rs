// An `IoVecMut`'s views never overlap while both are usable.
//
// Violation: a driver lends one part of a request's vector to a child
// request (`slice_mut`) and, while that part is still lent, writes through
// the whole vector (which covers the lent part too).
// Expected: error[E0499]: cannot borrow `iov` as mutable more than once at
// a time: `slice_mut` lends the vector as `&mut [u8]` indexing would.
use std::io::IoSliceMut;

use blockgraph::IoVecMut;

fn main() {
    let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
    let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
    let mut iov = IoVecMut::new(&mut segs);
    let mut part = iov.slice_mut(2, 4);
    iov.fill(0);
    part.fill(1);
}
