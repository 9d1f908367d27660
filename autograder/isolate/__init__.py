"""Where student code runs: the bubblewrap sandbox, cgroups, the seccomp filter, the sandboxed kernel launcher, the in-process guard and process-tree helpers."""
