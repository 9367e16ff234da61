"""`distillery demo`: the whole pipeline end to end, with a report."""
