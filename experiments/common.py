"""Flags and helpers shared by the experiment binaries.

Only binaries import this module, so the flags exist only in programs that
train something. Every user-facing failure ends as one line on stderr and
exit status 2 (`fail`), never as a traceback from inside JAX.
"""

import json
import math
import os
import sys
import tempfile

import jax
from absl import app
from absl import flags
from absl import logging

from lmser_jax import distributed
from lmser_jax import train_loop
from lmser_jax.data import idx
from lmser_jax.data import mnist

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "data_dir", None,
    "Dataset folder: the four IDX files of MNIST or Fashion-MNIST (gzip or"
    " raw), or aligned CelebA JPEGs for the face experiment. When unset,"
    " the data is loaded through tensorflow-datasets, which needs a network.")
flags.DEFINE_enum("dataset", "mnist", mnist.DATASETS, "Dataset to use.")
flags.DEFINE_string("workdir", None,
                    "Directory for checkpoints, metrics and results.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, data order and noise.")
flags.DEFINE_integer("batch_size", 50, "Training batch size (all devices).")
flags.DEFINE_integer("eval_batch_size", 500,
                     "Evaluation batch size; the last batch is padded.")
flags.DEFINE_float("learning_rate", 0.01, "Adam's initial learning rate.")
flags.DEFINE_float("decay_rate", 0.9999,
                   "Factor applied to the learning rate after every step.")
flags.DEFINE_float("adam_b1", 0.9, "Adam's first-moment decay.")
flags.DEFINE_float("adam_b2", 0.999, "Adam's second-moment decay.")
flags.DEFINE_float("adam_eps", 1e-8, "Adam's epsilon.")
flags.DEFINE_integer("reflections", 1, "Reflections per perception in training.")
flags.DEFINE_float("label_weight", 1.0,
                   "Weight of the cross-entropy term of supervised models.")
flags.DEFINE_integer(
    "max_shift", 0,
    "Data augmentation: translate each training image by a random offset of"
    " up to this many pixels per direction, a new draw every step (0: off).")
flags.DEFINE_integer(
    "steps_per_call", 1,
    "Training steps per compiled call (one lax.scan), which saves the host's"
    " dispatch cost per step. Calls stop at every logging and checkpoint"
    " step, so make those intervals multiples of this value.")
flags.DEFINE_bool("remat", False,
                  "Recompute reflections in the backward pass to save memory.")
flags.DEFINE_integer(
    "remat_carries", None,
    "With --remat, the most carries (states passed between reflections)"
    " that the backward pass stores besides the first; the others are"
    " recomputed. Unset: one per reflection.")
flags.DEFINE_enum("activation", "relu", ["relu", "sigmoid"],
                  "Hidden activation f.")
flags.DEFINE_enum("kernel_init", "he", ["he", "glorot"],
                  "Kernel initialisation: He-uniform or Glorot-uniform.")
flags.DEFINE_enum("code_activation", "hidden", ["hidden", "linear"],
                  "Free code units: the hidden activation, or linear.")
flags.DEFINE_integer("log_every_steps", 500,
                     "Steps between progress lines and metric records.")
flags.DEFINE_integer("checkpoint_every_steps", 2000,
                     "Steps between rolling checkpoints.")
flags.DEFINE_integer(
    "eval_examples", 0,
    "Evaluate on the first N test examples only (0: the whole test split).")
flags.DEFINE_enum(
    "distributed", "flags", ["flags", "auto"],
    "How this process finds the other processes of a multi-process run."
    " 'flags': join them when --coordinator_address is set, as process"
    " --process_id of --num_processes; without it, run as one process."
    " 'auto': let JAX detect the run from the cluster environment (Cloud TPU"
    " pod slices, Slurm, Open MPI); the three flags override what it"
    " detects.")
flags.DEFINE_string(
    "coordinator_address", None,
    "host:port where process 0 runs JAX's coordination service; every"
    " process of a multi-process run gets the same value.")
flags.DEFINE_integer("num_processes", None,
                     "Number of processes in a multi-process run.")
flags.DEFINE_integer(
    "process_id", None,
    "This process's index in [0, --num_processes). Process 0 runs the"
    " coordinator and writes results; the only flag that differs between"
    " processes.")
flags.DEFINE_integer(
    "coordinator_timeout_seconds", 300,
    "Seconds to wait for all processes to join the coordinator before"
    " exiting with an error.")

# Flags that may differ between the processes of one run: the process's own
# index, and absl's logging and debugging options.
_PER_PROCESS_FLAGS = frozenset({"process_id"})
_PER_PROCESS_FLAG_MODULES = ("absl.",)


def fail(message: str) -> None:
  """Print `error: message` on one line to stderr and exit with status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def require_positive(**values) -> None:
  for name, value in values.items():
    if value is None or value <= 0:
      fail(f"--{name}={value} is invalid; expected a positive number")


def check_list_flag(name: str, allowed) -> list[str]:
  """Return list flag `--name`, or fail unless its values are distinct and allowed."""
  values = getattr(FLAGS, name)
  if not values:
    fail(f"--{name} is empty; expected at least one value")
  if len(set(values)) != len(values):
    fail(f"--{name}={','.join(values)} names a value twice")
  for value in values:
    if value not in allowed:
      fail(f"--{name} contains {value!r}; expected any of {', '.join(allowed)}")
  return list(values)


def parse_int_list(name: str, minimum: int = 1) -> tuple[int, ...]:
  """Parse list flag `--name` into sorted distinct integers >= `minimum`, or fail."""
  values = getattr(FLAGS, name)
  kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
  try:
    numbers = sorted({int(v) for v in values})
  except ValueError:
    numbers = []
  if not numbers or numbers[0] < minimum:
    fail(f"--{name}={','.join(values)} is invalid; expected comma-separated"
         f" {kind}")
  return tuple(numbers)


def _check_distributed_flags() -> None:
  require_positive(
      coordinator_timeout_seconds=FLAGS.coordinator_timeout_seconds)
  if FLAGS.num_processes is not None and FLAGS.num_processes <= 0:
    fail(f"--num_processes={FLAGS.num_processes} is invalid; expected a"
         " positive number")
  if (FLAGS.num_processes is not None and FLAGS.process_id is not None and
      not 0 <= FLAGS.process_id < FLAGS.num_processes):
    fail(f"--process_id={FLAGS.process_id} is invalid; expected a value in"
         f" [0, {FLAGS.num_processes}) for --num_processes="
         f"{FLAGS.num_processes}")
  address = FLAGS.coordinator_address
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      fail(f"--coordinator_address={address} is invalid; expected host:port,"
           " for example 10.0.0.1:1234")
  if FLAGS.distributed == "auto":
    return
  if address is None:
    for name in ("num_processes", "process_id"):
      if getattr(FLAGS, name) is not None:
        fail(f"--{name} needs --coordinator_address (or --distributed=auto)")
    return
  for name in ("num_processes", "process_id"):
    if getattr(FLAGS, name) is None:
      fail(f"--coordinator_address needs --{name} (or --distributed=auto)")


def _resolved_flags() -> dict[str, str]:
  """Flag name to serialised value, without the flags that may differ."""
  values = {}
  for name in FLAGS:
    module = FLAGS.find_module_defining_flag(name) or ""
    if name in _PER_PROCESS_FLAGS or module.startswith(
        _PER_PROCESS_FLAG_MODULES):
      continue
    values[name] = FLAGS[name].serialize()
  return values


def setup_runtime() -> None:
  """Join the other processes when the flags ask for it, and compare flags.

  Must run before anything uses a device. Ends the process with a one-line
  error on invalid distributed flags, on a coordinator that is not reached
  within --coordinator_timeout_seconds, and on flags that differ between
  the processes (except --process_id and absl's own flags). In a
  multi-process run, an uncaught exception later ends its process at once
  (see `distributed.exit_on_uncaught_exception`). Without
  --coordinator_address and with --distributed=flags, it starts nothing.
  `check_common_flags` calls it first.
  """
  _check_distributed_flags()
  if FLAGS.distributed == "flags" and FLAGS.coordinator_address is None:
    return
  try:
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        timeout_seconds=FLAGS.coordinator_timeout_seconds,
        timeout_advice=(
            "Start every process with the same --coordinator_address and"
            " --num_processes, check that process 0 is running and that its"
            " port is reachable from this host, or raise"
            " --coordinator_timeout_seconds."))
  except ValueError as error:
    advice = ""
    if FLAGS.distributed == "auto":
      # JAX raises ValueError when it detects no cluster environment.
      advice = (" --distributed=auto found no Cloud TPU, Slurm or Open MPI"
                " environment; set --coordinator_address, --num_processes and"
                " --process_id instead.")
    fail(f"could not start the JAX distributed runtime: {error}{advice}")
  distributed.exit_on_uncaught_exception()
  logging.info("Process %d of %d, with %d of the %d devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  values = _resolved_flags()
  try:
    differing = distributed.differing_values(values)
  except ValueError as error:
    fail(str(error))
  if differing:
    local_values = ", ".join(f"--{name}={values[name]}" for name in differing)
    fail(f"flags differ between processes; process {jax.process_index()} has"
         f" {local_values}. Give every process the same flags except"
         " --process_id.")


def check_common_flags(data_description: str | None = None) -> None:
  """Start the multi-process runtime if asked, then reject bad flag values.

  Every rejection is a one-line error. See `setup_runtime` for the
  multi-process checks. `data_description` names what `--data_dir` should
  hold (default: the IDX files of `--dataset`).
  """
  setup_runtime()
  if not FLAGS.workdir:
    fail("--workdir is required: the directory for checkpoints and results")
  require_positive(
      batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
      learning_rate=FLAGS.learning_rate, decay_rate=FLAGS.decay_rate,
      reflections=FLAGS.reflections, log_every_steps=FLAGS.log_every_steps,
      steps_per_call=FLAGS.steps_per_call,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps)
  require_positive(adam_eps=FLAGS.adam_eps)
  for name in ("learning_rate", "decay_rate", "adam_b1", "adam_b2",
               "adam_eps", "label_weight"):
    value = getattr(FLAGS, name)
    if not math.isfinite(value):
      fail(f"--{name}={value} is invalid; expected a finite number")
  if FLAGS.decay_rate > 1:
    fail(f"--decay_rate={FLAGS.decay_rate} is invalid; expected a value in"
         " (0, 1]")
  for name in ("adam_b1", "adam_b2"):
    value = getattr(FLAGS, name)
    if not 0 <= value < 1:
      fail(f"--{name}={value} is invalid; expected a value in [0, 1)")
  if FLAGS.label_weight < 0:
    fail(f"--label_weight={FLAGS.label_weight} is invalid; expected >= 0")
  if FLAGS.seed < 0:
    fail(f"--seed={FLAGS.seed} is invalid; expected an integer >= 0")
  if FLAGS.remat_carries is not None:
    if FLAGS.remat_carries < 0:
      fail(f"--remat_carries={FLAGS.remat_carries} is invalid; expected an"
           " integer >= 0")
    if not FLAGS.remat:
      fail(f"--remat_carries={FLAGS.remat_carries} needs --remat; add"
           " --remat or drop --remat_carries")
  if not 0 <= FLAGS.max_shift < 8:
    fail(f"--max_shift={FLAGS.max_shift} is invalid; expected an integer"
         " from 0 to 7 (pixels)")
  check_workdir()
  if FLAGS.eval_examples < 0:
    fail(f"--eval_examples={FLAGS.eval_examples} is invalid; expected >= 0")
  if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
    what = data_description or f"the {FLAGS.dataset} IDX files"
    fail(f"--data_dir={FLAGS.data_dir} is not a directory; expected the"
         f" folder with {what}")
  # In a multi-process run this counts the devices of every process.
  num_devices = jax.device_count()
  where = (f", in {jax.process_count()} processes"
           if jax.process_count() > 1 else "")
  for name in ("batch_size", "eval_batch_size"):
    value = getattr(FLAGS, name)
    if value % num_devices:
      fail(f"--{name}={value} is invalid: it must be a multiple of the number"
           f" of devices ({num_devices}{where})")


def check_workdir() -> None:
  """Fail with one line unless `--workdir` is (or can become) a writable folder."""
  workdir = FLAGS.workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    fail(f"--workdir={workdir} is a file; expected a directory for"
         " checkpoints and results")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    fail(f"--workdir={workdir} is not a writable directory"
         f" ({error.strerror or error})")


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags for `app.run`, turning a parse error into one `error:` line."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    fail(f"{error}; pass --helpshort for the list of flags")


def run(main) -> None:
  """Run an absl `main` with one-line errors for bad flags and interrupts.

  Ctrl-C ends the program with exit status 130 and one line: finished
  checkpoints and measurements are on disk, so rerunning resumes.
  """

  def guarded(argv):
    try:
      main(argv)
    except (train_loop.SettingsMismatchError,
            train_loop.RunDirInUseError) as error:
      fail(str(error))
    except KeyboardInterrupt:
      print("error: interrupted; rerun the same command to resume from the"
            " latest checkpoint", file=sys.stderr)
      sys.exit(130)

  app.run(guarded, flags_parser=parse_flags)


def load_data() -> tuple[mnist.Split, mnist.Split]:
  """Train and test splits of `--dataset`, or a one-line exit on bad data."""
  try:
    train = mnist.load_split(FLAGS.dataset, "train", FLAGS.data_dir)
    test = mnist.load_split(FLAGS.dataset, "test", FLAGS.data_dir)
  except idx.DataError as error:
    fail(str(error))
  if FLAGS.eval_examples:
    test = mnist.Split(test.images[:FLAGS.eval_examples],
                       test.labels[:FLAGS.eval_examples])
  if FLAGS.batch_size > len(train):
    fail(f"--batch_size={FLAGS.batch_size} is larger than the {len(train)}"
         " training examples")
  logging.info("Loaded %s: %d training and %d test examples.", FLAGS.dataset,
               len(train), len(test))
  return train, test


def model_overrides() -> dict:
  """`ModelConfig` fields set by the shared flags."""
  return dict(activation=FLAGS.activation, kernel_init=FLAGS.kernel_init,
              code_activation=FLAGS.code_activation)


def train_options(num_train_steps: int, keep_steps=()) -> train_loop.TrainOptions:
  """`TrainOptions` from the shared flags."""
  return train_loop.TrainOptions(
      num_train_steps=num_train_steps,
      batch_size=FLAGS.batch_size,
      seed=FLAGS.seed,
      learning_rate=FLAGS.learning_rate,
      decay_rate=FLAGS.decay_rate,
      b1=FLAGS.adam_b1,
      b2=FLAGS.adam_b2,
      eps=FLAGS.adam_eps,
      reflections=FLAGS.reflections,
      label_weight=FLAGS.label_weight,
      remat=FLAGS.remat,
      remat_carries=FLAGS.remat_carries,
      max_shift=FLAGS.max_shift,
      steps_per_call=FLAGS.steps_per_call,
      log_every_steps=FLAGS.log_every_steps,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps,
      keep_steps=tuple(keep_steps))


def is_writer() -> bool:
  """Return whether this process writes results (process 0 only)."""
  return jax.process_index() == 0


def write_json(path: str, value) -> None:
  """Write `value` as JSON at `path` atomically (temporary file, then rename)."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_text(path: str, text: str) -> None:
  """Write `text` at `path` atomically."""
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as stream:
    stream.write(text)
  os.replace(temporary, path)


def fail_if_diverged(results: dict, out_dir: str) -> None:
  """Exit with one line if any model of `results["models"]` diverged.

  Called after the results are written, so that the finished models'
  measurements are kept while the exit status still reports the failure.
  """
  diverged = [key for key, entry in results["models"].items()
              if entry.get("status") == "diverged"]
  if diverged:
    fail(f"{len(diverged)} model(s) diverged: {', '.join(diverged)};"
         f" their messages are in {out_dir}/results.json")


def read_json(path: str):
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def write_flags(directory: str) -> None:
  """Record the resolved flags of this run in `directory/flags.txt`."""
  write_text(os.path.join(directory, "flags.txt"), FLAGS.flags_into_string())


class _DropLibraryInfo:
  """Drop INFO records of orbax (one per save step) and of JAX's backend probe.

  JAX logs at INFO that it found no TPU each time it starts on a CPU
  machine, which would turn every one-line error of the binaries into two.
  """

  def filter(self, record) -> bool:
    if record.levelno > 20:
      return True
    return ("/orbax/" not in record.pathname and
            "xla_bridge" not in record.pathname)


def quiet_library_logs() -> None:
  """Keep absl INFO output for progress lines, without library chatter."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
