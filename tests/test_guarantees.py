"""The guarantee list: every row of the README's guarantee table, and every stage, maps to the tests
that check it, and each of those tests exists and runs in the default `pytest -q` (no marker or
skip keeps it out). A test renamed or removed, or a guarantee added to the README without a test,
fails here."""

from __future__ import annotations

import ast
import re
import tomllib

import pytest

from tasks.cli import STAGES
from tests.conftest import REPO

GUARANTEES: dict[str, list[str]] = {
    "a bad file never stops a run": [
        "tests/faults/test_bad_inputs.py::test_bad_files_are_quarantined_with_a_reason_and_the_run_completes",
    ],
    "bad data or configuration stops early, in one line": [
        "tests/tasks/test_ingest.py::test_labels_naming_missing_files_stop_ingest_with_examples_and_the_likely_cause",
        "tests/tasks/test_ingest.py::test_a_class_without_a_training_example_stops_ingest",
        "tests/tasks/test_ingest.py::test_a_quarantined_share_above_the_limit_stops_ingest",
        "tests/tasks/test_cli.py::test_wrong_types_in_the_shared_sections_fail_in_one_line",
        "tests/tasks/test_cli.py::test_a_stage_started_before_its_input_exists_says_which_stage_to_run",
        "tests/tasks/test_cli.py::test_a_raw_file_edited_after_ingest_stops_preprocess_in_one_line",
        "tests/flows/test_pipeline.py::test_a_stage_that_exits_on_bad_input_runs_once_and_a_crashing_one_is_retried",
    ],
    "killed at any moment, a re-run ends bit-identical": [
        "tests/faults/test_kills.py::test_killed_anywhere_then_rerun_ends_bit_identical",
        "tests/tasks/test_pretrain.py::test_killed_run_resumes_to_the_same_weights",
        "tests/tasks/test_checkpoints.py::test_a_kill_between_the_manifest_and_the_rename_leaves_the_older_checkpoint_in_charge",
    ],
    "two runs on one workspace never collide": [
        "tests/faults/test_concurrent.py::test_a_second_run_of_a_busy_domain_refuses_in_one_line_naming_the_holder",
        "tests/faults/test_concurrent.py::test_the_second_run_waits_for_the_first_then_runs_and_another_domain_does_not_wait",
        "tests/faults/test_concurrent.py::test_two_runs_of_one_stage_started_at_once_leave_one_intact_output",
        "tests/faults/test_concurrent.py::test_first_runs_at_once_share_one_salt",
    ],
    "a corrupt checkpoint is never loaded": [
        "tests/tasks/test_checkpoints.py::test_a_damaged_or_unverifiable_checkpoint_is_never_loaded",
        "tests/faults/test_corrupt_artifacts.py::test_a_damaged_shard_or_encoder_is_named_and_never_read",
    ],
    "checkpoint identity means what it says": [
        "tests/tasks/test_checkpoints.py::test_cosmetic_settings_resume_and_a_code_change_starts_over",
        "tests/tasks/test_pretrain.py::test_checkpoints_of_another_configuration_are_not_resumed",
    ],
    "no network": [
        "tests/flows/test_worker.py::test_a_long_pretrain_under_a_worker_stays_running_and_a_lost_worker_resumes_from_its_checkpoint",
        "tests/faults/test_network.py::test_dvc_version_and_doctor_make_no_connection_attempt",
        "tests/faults/test_network.py::test_prefect_settings_are_offline_under_the_project_env",
    ],
    "every input in lineage": [
        "tests/tasks/test_lineage.py::test_verify_names_an_edited_labels_csv",
        "tests/tasks/test_lineage.py::test_which_names_the_shards_checkpoints_and_models_that_consumed_a_record",
        "tests/tasks/test_lineage.py::test_removing_a_record_and_re_running_rebuilds_what_depended_on_it",
    ],
    "long runs under Prefect": [
        "tests/flows/test_worker.py::test_a_long_pretrain_under_a_worker_stays_running_and_a_lost_worker_resumes_from_its_checkpoint",
        "tests/flows/test_worker.py::test_serve_registers_its_deployment_with_the_same_automation",
    ],
    "no input takes a stage past a stated peak": [
        "tests/faults/test_bombs.py::test_a_png_bomb_is_refused_from_its_header_before_any_pixel_is_decoded",
        "tests/faults/test_bombs.py::test_a_tiled_tiff_bomb_opened_by_openslide_is_refused_from_its_level_sizes",
        "tests/faults/test_bombs.py::test_nifti_and_dicom_bombs_are_refused_from_their_headers",
        "tests/faults/test_bombs.py::test_a_sparse_4d_nifti_reads_only_its_first_volume",
        "tests/faults/test_bombs.py::test_a_200_mb_single_line_text_is_quarantined_at_ingest_with_its_size",
        "tests/faults/test_bombs.py::test_audio_longer_than_max_samples_is_refused_from_its_header",
        "tests/faults/test_bombs.py::test_ingest_quarantines_every_bomb_under_the_stated_peak_and_keeps_the_good_files",
    ],
    "reports quote what they are given": [
        "tests/tasks/test_report_escaping.py::test_the_report_quotes_paths_labels_and_reasons_and_draws_its_figures",
        "tests/tasks/test_report_escaping.py::test_the_html_step_keeps_raw_html_as_text",
        "tests/tasks/test_report_escaping.py::test_class_names_with_mathtext_are_drawn_as_written",
        "tests/tasks/test_report_escaping.py::test_the_prefect_artifacts_carry_the_escaped_report",
        "tests/tasks/test_report_escaping.py::test_the_model_card_quotes_the_labels_path",
    ],
    "configuration cannot half-load": [
        "tests/tasks/test_config_refusals.py::test_a_params_file_of_random_bytes_is_refused_naming_the_file",
        "tests/tasks/test_config_refusals.py::test_a_block_cut_off_before_sections_dvc_declares_is_refused_naming_them",
        "tests/tasks/test_config_refusals.py::test_dvc_finds_the_same_parameters_missing_as_the_refusal_names",
        "tests/tasks/test_config_refusals.py::test_a_non_finite_number_anywhere_in_the_block_is_refused",
        "tests/tasks/test_config_refusals.py::test_absurd_numbers_are_refused_in_one_line",
    ],
    "errors name their cause": [
        "tests/tasks/test_cli_errors.py::test_a_full_disk_is_named_in_one_line_with_exit_status_2",
        "tests/tasks/test_cli_errors.py::test_a_pickle_checkpoint_a_library_loads_is_refused_naming_the_file",
        "tests/tasks/test_cli_errors.py::test_lineage_which_on_a_name_with_escapes_prints_them_escaped",
        "tests/tasks/test_label_conflicts.py::test_one_file_labeled_twice_differently_is_refused_naming_both_rows",
    ],
    "the corpus boundary holds": [
        "tests/tasks/test_corpus_boundary.py::test_symlinks_leaving_the_corpus_are_quarantined_not_followed",
        "tests/tasks/test_corpus_boundary.py::test_follow_symlinks_reads_outside_targets_and_logs_a_count",
        "tests/tasks/test_corpus_boundary.py::test_link_loops_outside_the_corpus_end_and_nothing_is_read_twice",
    ],
    "a private domain's salt and outputs stay private": [
        "tests/tasks/test_salt_and_modes.py::test_a_missing_salt_is_not_made_anew_once_outputs_used_it",
        "tests/tasks/test_salt_and_modes.py::test_a_salt_others_may_read_is_made_owner_only_with_a_warning",
        "tests/tasks/test_salt_and_modes.py::test_a_pseudonymising_domain_writes_owner_only_outputs_and_others_keep_their_modes",
        "tests/tasks/test_salt_and_modes.py::test_dvc_run_under_umask_077_keeps_its_cache_behind_owner_only_folders",
    ],
    "a cancel stops the work": [
        "tests/faults/test_cancel.py::test_a_signalled_stage_stops_its_children_releases_the_lock_and_says_one_line",
        "tests/faults/test_cancel.py::test_a_second_signal_while_unwinding_prints_no_traceback",
        "tests/faults/test_cancel.py::test_a_stage_dvc_started_stops_when_dvc_dies_and_a_nohup_one_does_not",
        "tests/faults/test_cancel.py::test_sigterm_to_dvc_repro_stops_the_stage_and_the_next_run_resumes",
        "tests/faults/test_cancel.py::test_a_signal_to_the_flow_stops_the_stage_and_the_temporary_server_and_the_next_run_resumes",
    ],
    "a team shares results through a DVC remote": [
        "tests/flows/test_remote.py::test_a_fresh_clone_pulls_from_the_remote_and_has_nothing_to_run",
        "tests/flows/test_remote.py::test_lineage_diff_of_pulled_outputs_names_no_code_difference",
    ],
    "ingest's memory does not grow with the corpus": [
        "tests/tasks/test_ingest.py::test_ingest_memory_does_not_grow_with_the_corpus",
    ],
    "the data side spreads over cores or a Dask cluster": [
        "tests/tasks/test_parallel_ingest.py::test_manifest_quarantine_and_shards_are_byte_identical_for_1_and_2_workers_and_dask",
        "tests/faults/test_kills_chunked.py::test_a_killed_chunked_ingest_resumes_at_its_first_unfinished_chunk",
        "tests/faults/test_kills_chunked.py::test_a_killed_chunked_tiling_resumes_at_its_first_unfinished_chunk",
    ],
}

# Every stage, run whole, by the flow and by `dvc repro`, and re-run to the same bytes.
STAGE_TESTS = [
    "tests/flows/test_pipeline.py::test_flow_runs_every_stage_then_none",
    "tests/flows/test_pipeline.py::test_dvc_is_up_to_date_and_a_finetune_param_reruns_only_downstream",
    "tests/test_dvc_contract.py::test_stage_outputs_are_byte_identical_when_re_run",
    "tests/test_dvc_contract.py::test_the_paths_a_stage_writes_are_exactly_its_dvc_outputs",
]
STAGES_TESTED: dict[str, list[str]] = {stage: STAGE_TESTS for stage in STAGES} | {
    "default_data": [*STAGE_TESTS, "tests/tasks/test_own_corpus.py::test_whole_legal_path_on_a_mixed_format_folder"],
    "ingest": [*STAGE_TESTS, "tests/tasks/test_ingest.py::test_manifest_quarantine_and_duplicates"],
    "preprocess": [*STAGE_TESTS, "tests/tasks/test_pretrain.py::test_preprocess_in_two_processes_gives_identical_shards"],
    "pretrain": [*STAGE_TESTS, "tests/tasks/test_pretrain.py::test_two_runs_give_bit_identical_weights_and_log_rankme"],
    "finetune": [*STAGE_TESTS,
                 "tests/tasks/test_finetune.py::test_every_init_runs_its_protocols_on_paired_subsets_with_per_sample_predictions"],
    "evaluate": [*STAGE_TESTS, "tests/flows/test_pipeline.py::test_report_metrics_schema_and_lineage"],
    "report": [*STAGE_TESTS, "tests/flows/test_pipeline.py::test_report_metrics_schema_and_lineage"],
    "export": [*STAGE_TESTS,
               "tests/tasks/test_export.py::test_the_export_stage_card_tells_a_governance_board_what_it_needs"],
}


def readme_guarantees() -> list[str]:
    """The first column of the README's guarantee table."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| guarantee | how | test |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_every_readme_guarantee_is_in_the_list() -> None:
    assert readme_guarantees() == list(GUARANTEES)


def test_every_stage_is_in_the_list() -> None:
    assert set(STAGES_TESTED) == set(STAGES)


def _skipped_always(function: ast.FunctionDef) -> bool:
    return any("skip" in ast.unparse(decorator) and "skipif" not in ast.unparse(decorator)
               for decorator in function.decorator_list)


@pytest.mark.parametrize("node", sorted({n for nodes in [*GUARANTEES.values(), *STAGES_TESTED.values()] for n in nodes}))
def test_each_listed_test_exists_and_runs_by_default(node: str) -> None:
    path, _, name = node.partition("::")
    tree = ast.parse((REPO / path).read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert name in functions, f"{node} is gone: update GUARANTEES (and the README's table)"
    assert not _skipped_always(functions[name]), f"{node} is always skipped"
    module_marks = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)]
    assert not any("skip(" in m for m in module_marks), f"{path} is skipped whole"


def test_the_default_run_deselects_nothing() -> None:
    """`pytest -q` (README, .ci/run) selects every test: no `-m` or `-k` among the default options."""
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert not re.search(r"(^|\s)-(m|k)\b", options.get("addopts", ""))
    readme = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert (REPO / ".ci/run").read_text().splitlines()[-1] == readme[1] == ".venv/bin/python -m pytest -q"
