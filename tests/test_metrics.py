"""gpt1_ds.metrics: FLOPs and MFU, and a TensorBoard writer whose failures never end a run."""

from __future__ import annotations

from gpt1_ds.model import GPTConfig


def test_flops_formula_counts_matmul_parameters():
    from gpt1_ds.metrics import flops_per_token, mfu, num_matmul_params

    config = GPTConfig.from_preset("gpt1")
    n = 116_534_784 - 512 * 768
    assert num_matmul_params(config) == n
    assert flops_per_token(config, 512) == 6 * n + 12 * 12 * 512 * 768
    assert mfu(1000.0, config, 512, peak_flops=flops_per_token(config, 512) * 2000) == 0.5


def test_a_failing_tensorboard_write_is_logged_and_the_run_goes_on(tmp_path, caplog):
    from gpt1_ds.metrics import Monitor

    monitor = Monitor(str(tmp_path / "tb"))

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monitor.writer.add_scalar = full_disk
    with caplog.at_level("WARNING"):
        monitor.scalars({"train/loss": 1.0}, 1)  # no exception
        monitor.text("sample", "text", 1)  # the other writes still happen
        monitor.close()
    assert "TensorBoard add_scalar failed, skipped (OSError" in caplog.text
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
