"""`kport ui`: the web GUI, an unprivileged client of the daemon's ports (server and page)."""
