"""distillery: distil a large LLM teacher into a small, fast student, serve it and keep improving it."""

import os

# gRPC's C core (1.81 to at least 1.85) runs its fork handlers in every child that `subprocess.Popen` forks with a
# `preexec_fn` (ours set PR_SET_PDEATHSIG): the child restarts gRPC's poller thread, Popen closes the poller's epoll
# descriptor before exec, and the child aborts with "epoll_wait error: Bad file descriptor" (grpc/grpc#43055). Our
# processes never use gRPC in a forked child without exec (vLLM, the ranks and the benchmarks' clients spawn), so
# gRPC's fork support is off unless the environment says otherwise. Set here, before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
