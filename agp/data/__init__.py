"""Source ingestion, filters, the four lanes, and the offline prompt pack."""
