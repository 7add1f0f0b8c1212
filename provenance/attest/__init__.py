"""The receipts: the Statement model shared by writer and reader, writing statements, and signing them."""
