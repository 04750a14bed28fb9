//! Integration tests of the gateway against real upstream servers.
