"""The rules: text syntax (tcprules), the compiled cdb, and the lookup shared by server and checker."""
