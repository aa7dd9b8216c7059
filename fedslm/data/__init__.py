"""Site data: reading and validating files, splitting into sites, and the synthetic data set."""

from fedslm.data.sites import (
    SiteFiles,
    SitePlan,
    duplicate_warning,
    infer_labels,
    materialize_sites,
    plan_sites,
    planned_labels,
    read_site_file,
    split_site,
    write_sites,
)
from fedslm.data.split import split_by_column, split_dirichlet, split_iid, train_eval_split
from fedslm.data.synthetic import INTENTS, corpus_for_tokenizer, generate_bank_messages
from fedslm.data.tables import (
    Examples,
    Instructions,
    Table,
    check_labels,
    file_sha256,
    read_examples,
    read_instructions,
    read_rows,
    read_table,
    write_rows,
)

__all__ = [
    "INTENTS",
    "Examples",
    "Instructions",
    "SiteFiles",
    "SitePlan",
    "Table",
    "check_labels",
    "corpus_for_tokenizer",
    "duplicate_warning",
    "file_sha256",
    "generate_bank_messages",
    "infer_labels",
    "materialize_sites",
    "plan_sites",
    "planned_labels",
    "read_examples",
    "read_instructions",
    "read_rows",
    "read_site_file",
    "read_table",
    "split_by_column",
    "split_dirichlet",
    "split_iid",
    "split_site",
    "train_eval_split",
    "write_rows",
    "write_sites",
]
