"""The Build Event Service endpoint: Bazel streams its Build Event Protocol here (docs/bazel.md)."""

import os

# Before grpc is imported: gRPC core's fork support restarts its EventEngine poller in a forked
# child, where subprocess.Popen(close_fds=True) has closed the poller's epoll fd before exec; the
# child then aborts ("epoll_wait error: Bad file descriptor") instead of running the program
# (grpc/grpc#43055, grpcio >= 1.80; open upstream).  A process that serves BES and starts engines
# or builds (buildtel up, the tests) never uses gRPC in a child, so it needs no fork support.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
