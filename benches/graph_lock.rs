//! Graph lock benchmark (S1-S5 against std, parking_lot, crossbeam, tokio,
//! async-lock and the F0/F1/F2 kernels): being written, see issue 4.

fn main() {}
