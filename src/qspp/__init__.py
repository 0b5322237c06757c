"""qspp: qmail-smtpd with the qmail-spp plugin interface built in."""
