//! pgquorum router: follows the coordinators' endpoint map and forwards client
//! connections to the current primary (read-write port) or a fitting replica
//! (per-workload read-only ports). Built in a later step; see DESIGN.md and the open issues.
