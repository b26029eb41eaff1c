//! Fixtures: real redis-server processes and respire on free loopback ports.
