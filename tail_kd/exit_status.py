"""The exit statuses of `tail-kd train` (and `python -m tail_kd.train`): the contract with users
and with the shell scripts, which read them with `eval "$(python -m tail_kd.exit_status)"`.

    0   the run finished (`DONE` is written in the output directory), or stopped as asked by
        `--stop-after-steps` (with a checkpoint, without `DONE`)
    1   an error (traceback), or another rank's error (that rank reports it)
    2   the recipe, the command line, the output directory, the data or the models cannot be
        used (a message on stderr, no traceback)
    3   `train.max_skipped_steps` steps in a row had a non-finite loss or gradient: a checkpoint
        was written and the first bad tensor of each of these steps is named
    4   another rank died or hangs: a collective failed or timed out (`tail_kd.distributed`)
    74  a checkpoint could not be written (disk full, quota, I/O error); the previous ones are
        intact (74 is EX_IOERR)
    75  stopped by SIGUSR1, SIGTERM or SIGINT: the current step finished, a checkpoint was written;
        rerun with `--resume` to continue (75 is EX_TEMPFAIL, "try again later")
"""


class UsageError(ValueError):
    """Input that cannot be used (recipe, command line, environment, data, models, run dir): the
    message says what to change. Every command prints it on one line and exits with EXIT_USAGE."""


EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_RANK_LOST = 4
EXIT_CHECKPOINT_WRITE = 74
EXIT_PREEMPTED = 75


if __name__ == "__main__":  # TKD_EXIT_USAGE=2 ... for a shell's eval
    for name, value in list(globals().items()):
        if name.startswith("EXIT_"):
            print(f"TKD_{name}={value}")
