"""Sources and dispatch: where events come from (a stream, its subjects and consumer options, the record shape,
the ordering model), the mappings that feed functions from them, Lambda's batching, retry and partial-failure
semantics, and the dead-letter queue."""
