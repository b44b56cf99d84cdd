//! vpsci firmware engine (under construction).
