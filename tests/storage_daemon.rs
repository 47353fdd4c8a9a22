//! The storage daemon example as a user runs it (filled in next).
