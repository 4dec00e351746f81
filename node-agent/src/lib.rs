//! pgquorum agent: runs next to one PostgreSQL server, reports its state to the
//! coordinators and carries out their decisions (start, stop, promote, follow, rewind,
//! self-fence). Built in a later step; see DESIGN.md and the open issues.
