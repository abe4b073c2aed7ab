//! The durable fact spool (owner: helper "spool").
